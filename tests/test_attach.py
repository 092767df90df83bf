"""Which layers a transform takes, atomic attaching, and parameters replaced after attaching."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradshape as gs
from gradshape import transform


def net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2),
    )  # fmt: skip


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 2, (4,), generator=g)


def gradients(model, x, y):
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def unregistered(model):
    return all(id(p) not in transform._LIVE for p in model.parameters())


def hooks_of(model):
    return [
        (n, len(p._backward_hooks or {})) for n, p in model.named_parameters() if p._backward_hooks
    ]


# ---- frozen layers ---------------------------------------------------------------------------
@pytest.mark.parametrize("make", [gs.SpatialGradientScaling, gs.ChannelDirectedGradients])
def test_frozen_weights_are_skipped_with_a_reason_and_refused_by_name(make):
    model = net()
    model[2].weight.requires_grad_(False)
    t = make(model)
    assert "2" not in t.parameters and "frozen (requires_grad=False)" in t.skipped["2"]
    t.remove()
    with pytest.raises(ValueError, match=r"frozen.*module '2', asked for by include"):
        make(model, include=["2"])
    assert hooks_of(model) == []


def test_frozen_parametrized_weight_is_skipped():
    model = net()
    nn.utils.parametrizations.weight_norm(model[0])
    model[0].parametrizations.weight.original0.requires_grad_(False)
    model[0].parametrizations.weight.original1.requires_grad_(False)
    sgs = gs.SpatialGradientScaling(model)
    assert "frozen" in sgs.skipped["0"] and list(sgs.modules) == ["2"]
    sgs.remove()


# ---- atomic constructors ---------------------------------------------------------------------
def _failing_second_hook(monkeypatch, model):
    weight = model[2].weight

    def refuse(_hook):
        raise RuntimeError("cannot hook this one")

    monkeypatch.setattr(weight, "register_hook", refuse)


@pytest.mark.parametrize("make", [gs.SpatialGradientScaling, gs.ChannelDirectedGradients])
def test_a_failed_constructor_leaves_the_model_as_it_was(monkeypatch, make):
    model = net()
    x, y = batch()
    plain = gradients(model, x, y)
    _failing_second_hook(monkeypatch, model)
    with pytest.raises(RuntimeError, match="cannot hook this one"):
        make(model)
    monkeypatch.undo()
    assert hooks_of(model) == [] and unregistered(model)
    assert not model._forward_pre_hooks
    for name, g in gradients(model, x, y).items():
        assert torch.equal(g, plain[name])
    make(model).remove()  # attaching again works


def test_a_failed_constructor_removes_its_parametrizations(monkeypatch):
    model = net()
    nn.utils.parametrizations.weight_norm(model[0])
    before = [type(p).__name__ for p in model[0].parametrizations.weight]
    _failing_second_hook(monkeypatch, model)
    with pytest.raises(RuntimeError, match="cannot hook this one"):
        gs.SpatialGradientScaling(model)
    assert [type(p).__name__ for p in model[0].parametrizations.weight] == before


# ---- parameters replaced after attaching ---------------------------------------------------
def _replace_by_load_state_dict(model):
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)


def _replace_by_assignment(model):
    model[0].weight = nn.Parameter(model[0].weight.detach().clone())
    model[2].weight = nn.Parameter(model[2].weight.detach().clone())


@pytest.mark.parametrize("replace", [_replace_by_load_state_dict, _replace_by_assignment])
def test_gradient_scaling_follows_replaced_parameters(replace):
    model, x, y = net(), *batch()
    sgs = gs.SpatialGradientScaling(model)
    g0, g2 = torch.rand(3, 3) + 0.5, torch.rand(8, 3, 3) + 0.5
    sgs.set_scaling("0", g0)
    sgs.set_scaling("2", g2)
    replace(model)
    reference = net()
    reference.load_state_dict(model.state_dict())
    plain = gradients(reference, x, y)
    with pytest.warns(UserWarning, match=r"weights of \['0', '2'\] were replaced"):
        scaled = gradients(model, x, y)
    torch.testing.assert_close(scaled["0.weight"], plain["0.weight"] * g0)
    torch.testing.assert_close(scaled["2.weight"], plain["2.weight"] * g2[:, None])
    assert sgs.parameters["0"] is model[0].weight
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, then silent
        gradients(model, x, y)
    sgs.remove()
    assert hooks_of(model) == [] and unregistered(model)


def test_cdg_follows_a_replaced_parameter():
    model, x, y = net(), *batch()
    cdg = gs.ChannelDirectedGradients(model, include=["2"])
    reference = net()
    reference.load_state_dict(model.state_dict())
    expected = gs.channel_directed(
        gradients(reference, x, y)["2.weight"], a=cdg.a, smoothing=cdg.smoothing, dim=0
    )
    _replace_by_assignment(model)
    with pytest.warns(UserWarning, match="were replaced"):
        got = gradients(model, x, y)["2.weight"]
    torch.testing.assert_close(got, expected)


def test_update_mode_refuses_a_step_that_would_miss_a_replaced_parameter():
    model = net()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sgs = gs.SpatialGradientScaling(model, mode="update", optimizer=opt)
    _replace_by_assignment(model)
    gradients(model, *batch())
    with pytest.raises(RuntimeError, match="'0' was replaced and the optimizer does not hold"):
        opt.step()
    sgs.remove()


def test_a_replaced_module_is_named_at_the_next_forward_and_refused_by_refresh():
    model = net()
    sgs = gs.SpatialGradientScaling(model)
    model[2] = nn.Conv2d(8, 8, 3, padding=1)
    with pytest.warns(UserWarning, match=r"modules \['2'\] were replaced in the model"):
        model(batch()[0])
    with pytest.raises(RuntimeError, match=r"modules \['2'\] were replaced"):
        sgs.refresh([batch()[0]])


# ---- where "the kernel centre" means nothing ------------------------------------------------
def patchy():
    return nn.Sequential(
        nn.Conv2d(3, 8, 4, stride=4),  # a ViT/Swin patch embedding
        nn.Conv2d(8, 8, 3, padding=1),
        nn.Conv2d(8, 8, 2, stride=2),  # ConvNeXt's downsampling
        nn.Conv2d(8, 8, 3, stride=3),  # odd, but non-overlapping windows
    )


def test_even_and_patchify_convs_are_skipped_by_default_and_scaled_on_request():
    model = patchy()
    sgs = gs.SpatialGradientScaling(model)
    assert list(sgs.modules) == ["1"]
    assert "even kernel (4, 4)" in sgs.skipped["0"] and "even_kernels=True" in sgs.skipped["0"]
    assert "stride (3, 3) >= kernel (3, 3)" in sgs.skipped["3"]
    assert "patchify=True" in sgs.skipped["3"]
    sgs.remove()
    both = gs.SpatialGradientScaling(model, even_kernels=True, patchify=True)
    assert list(both.modules) == ["0", "1", "2", "3"]
    both.remove()
    odd_only = gs.SpatialGradientScaling(model, patchify=True)
    assert list(odd_only.modules) == ["1", "3"]  # the even ones stay out
    odd_only.remove()
    with pytest.raises(ValueError, match=r"even kernel.*module '2', asked for by include"):
        gs.SpatialGradientScaling(model, include=["2"], patchify=True)


def test_no_layer_error_counts_the_convs_and_says_why():
    model = nn.Sequential(nn.Conv2d(3, 8, 16, stride=16), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1))
    with pytest.raises(ValueError) as err:
        gs.SpatialGradientScaling(model)
    text = str(err.value)
    assert "Sequential has 3 convolutions and none to act on" in text
    assert "2 with a 1x1 kernel (e.g. '1'" in text and "1 with an even kernel (e.g. '0'" in text


def test_copies_of_an_attached_model_are_plain_models():
    """deepcopy (an EMA copy) and pickling work and carry no transform with them."""
    import copy
    import io

    model, x, y = net(), *batch()
    sgs = gs.SpatialGradientScaling(model)
    sgs.set_scaling("0", torch.rand(3, 3) + 0.5)
    reference = net()
    for twin in (copy.deepcopy(model), torch.load(_saved(model, io), weights_only=False)):
        assert hooks_of(twin) == []
        got, want = gradients(twin, x, y), gradients(reference, x, y)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)
    sgs.remove()


def _saved(model, io):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return buffer
