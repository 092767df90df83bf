"""Composition of SGS and CDG (and PowerGrad carried for state): order, state, removal."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradshape as gs
from gradshape.channel import ChannelDirectedGradients
from gradshape.powergrad import PowerGrad
from test_channel import dense_cdg

F64 = torch.float64
A, LAM = 0.5, 1.5
# Fixed G per conv, used as given by set_scaling.  Kernel-shaped G is constant along the output
# channels, so it commutes with CDG's output-axis map; one G per output channel, shape
# (c_out, kh, kw), does not, and makes the order of composition visible.
KERNEL_G = torch.tensor([[1.0, 2.0, 1.0], [2.0, 3.0, 2.0], [1.0, 2.0, 1.0]], dtype=F64)
G = {
    "0": torch.linspace(0.5, 3.0, 6, dtype=F64).view(6, 1, 1) * KERNEL_G,
    "2": torch.rand(5, 3, 3, dtype=F64, generator=torch.Generator().manual_seed(7)) + 0.25,
}


def scale(g_map: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """G ⊙ t with G kernel-shaped or (c_out, *kernel), broadcast over the input channels."""
    return (g_map if g_map.dim() == t.dim() - 2 else g_map.unsqueeze(1)) * t


def net_and_twin():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 5, 3),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(5, 3),
    ).to(F64)
    return net, copy.deepcopy(net)


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 2, 6, 6, generator=g, dtype=F64), torch.tensor([0, 2, 1, 1])


def make_sgs(net, scalings=G, **kwargs):
    sgs = gs.SpatialGradientScaling(net, **kwargs)
    for name, g in scalings.items():
        sgs.set_scaling(name, g)
    return sgs


def attach(net, scalings=G, **kwargs):
    """SGS then CDG, attached in that order (compose re-attaches them as it is told)."""
    sgs = make_sgs(net, scalings, **kwargs)
    return sgs, ChannelDirectedGradients(net, a=A, smoothing=LAM, **kwargs)


def conv_grads(net):
    net.zero_grad()
    x, y = batch()
    F.cross_entropy(net(x), y).backward()
    return {name: net[int(name)].weight.grad.clone() for name in G}


def sgs_then_cdg(name, g, scalings=G):
    return dense_cdg(scale(scalings[name], g), A, LAM)


def cdg_then_sgs(name, g, scalings=G):
    return scale(scalings[name], dense_cdg(g, A, LAM))


@pytest.mark.parametrize("built_cdg_first", [False, True])
def test_compose_sgs_then_cdg(built_cdg_first):
    net, twin = net_and_twin()
    if built_cdg_first:
        cdg = ChannelDirectedGradients(net, a=A, smoothing=LAM)
        sgs = make_sgs(net)
    else:
        sgs, cdg = attach(net)
    gs.compose(sgs, cdg)
    got, raw = conv_grads(net), conv_grads(twin)
    for name in G:
        torch.testing.assert_close(got[name], sgs_then_cdg(name, raw[name]), rtol=0, atol=1e-13)


def test_compose_cdg_then_sgs_differs():
    net, twin = net_and_twin()
    sgs, cdg = attach(net)
    gs.compose(cdg, sgs)
    got, raw = conv_grads(net), conv_grads(twin)
    for name in G:
        expected = cdg_then_sgs(name, raw[name])
        torch.testing.assert_close(got[name], expected, rtol=0, atol=1e-13)
        other_order = sgs_then_cdg(name, raw[name])
        assert (expected - other_order).abs().max() > 1e-2 * expected.abs().max()


def test_kernel_shaped_scaling_commutes_with_output_axis_cdg():
    kernel_only = dict.fromkeys(G, KERNEL_G)
    results = []
    for order in ("sgs_first", "cdg_first"):
        net, twin = net_and_twin()
        sgs, cdg = attach(net, kernel_only)
        gs.compose(sgs, cdg) if order == "sgs_first" else gs.compose(cdg, sgs)
        results.append(conv_grads(net))
    raw = conv_grads(twin)
    for name in G:
        expected = sgs_then_cdg(name, raw[name], kernel_only)
        torch.testing.assert_close(results[0][name], expected, rtol=0, atol=1e-13)
        torch.testing.assert_close(results[1][name], expected, rtol=0, atol=1e-13)


def test_compose_in_update_mode_maps_the_step():
    net, twin = net_and_twin()
    lr = 0.1
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    sgs, cdg = attach(net, mode="update", optimizer=opt)
    gs.compose(sgs, cdg)
    raw = conv_grads(twin)
    before = {name: net[int(name)].weight.detach().clone() for name in G}
    conv_grads(net)
    opt.step()
    for name in G:
        step = net[int(name)].weight.detach() - before[name]
        torch.testing.assert_close(step, sgs_then_cdg(name, -lr * raw[name]), rtol=0, atol=1e-14)


def test_composed_state_round_trip():
    net, _ = net_and_twin()
    sgs, cdg = attach(net)
    pgt = PowerGrad(alpha=0.3)
    both = gs.compose(sgs, cdg, pgt)
    state = both.state_dict()
    assert set(state) == {"0", "1", "2"}

    other, _ = net_and_twin()
    sgs2 = gs.SpatialGradientScaling(other)
    cdg2 = ChannelDirectedGradients(other, a=A, smoothing=LAM)
    pgt2 = PowerGrad()
    restored = gs.compose(sgs2, cdg2, pgt2)
    restored.load_state_dict(state)
    for name, g in G.items():
        torch.testing.assert_close(sgs2.scalings[name], g, rtol=0, atol=0)
    assert pgt2.alpha == 0.3
    # the restored pair transforms gradients like the original
    torch.testing.assert_close(conv_grads(other), conv_grads(net), rtol=0, atol=1e-14)

    mismatched = gs.compose(
        gs.SpatialGradientScaling(nn.Conv2d(1, 1, 3)), ChannelDirectedGradients(nn.Conv2d(1, 2, 3))
    )
    with pytest.raises(ValueError):
        mismatched.load_state_dict({"0": state["0"], "1": state["1"]})
    with pytest.raises(ValueError, match="expected keys"):
        restored.load_state_dict({"0": state["0"]})


def test_remove_detaches_all():
    net, twin = net_and_twin()
    both = gs.compose(*attach(net))
    both.remove()
    got, raw = conv_grads(net), conv_grads(twin)
    for name in G:
        assert torch.equal(got[name], raw[name])
    assert not any(t.attached for t in both)
