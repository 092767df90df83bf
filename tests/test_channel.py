"""ChannelDirectedGradients: the map against a dense solve, axes, hooks, state and errors."""

from __future__ import annotations

import copy
import doctest
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradshape.channel
from gradshape.channel import ChannelDirectedGradients, channel_directed

F64 = torch.float64


# ---- the dense reference, written from the spec's formula ------------------------------------
def metric(n: int, a: float, lam: float) -> torch.Tensor:
    """M = P + a(I − P) + λ(−Δ), P = 11ᵀ/n, −Δ the periodic second difference, as a matrix."""
    eye = torch.eye(n, dtype=F64)
    proj = torch.full((n, n), 1.0 / n, dtype=F64)
    shift = torch.roll(eye, 1, dims=0)
    neg_laplacian = 2 * eye - shift - shift.T
    return proj + a * (eye - proj) + lam * neg_laplacian


def dense_cdg(g: torch.Tensor, a: float, lam: float, dim: int = 0) -> torch.Tensor:
    """Solve M x = fibre for every fibre of ``g`` along ``dim`` with torch.linalg.solve."""
    x = g.to(F64).movedim(dim, -1)
    n = x.shape[-1]
    fibres = x.reshape(-1, n).T
    solved = torch.linalg.solve(metric(n, a, lam), fibres).T
    return solved.reshape(x.shape).movedim(-1, dim)


def dense_kron(g: torch.Tensor, a: float, lam: float) -> torch.Tensor:
    """(M_h ⊗ M_w)⁻¹ on the row-major flattened 2-D kernel of a (o, i, kh, kw) tensor."""
    o, i, kh, kw = g.shape
    m = torch.kron(metric(kh, a, lam), metric(kw, a, lam))
    flat = g.to(F64).reshape(o * i, kh * kw).T
    return torch.linalg.solve(m, flat).T.reshape(g.shape)


def conv_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 5, 3, padding=1),
        nn.BatchNorm2d(5),
        nn.ReLU(),
        nn.Conv2d(5, 4, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).to(F64)


def batch(seed: int = 1, n: int = 6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 5, 5, generator=g, dtype=F64), torch.randint(0, 3, (n,), generator=g)


def grads(net: nn.Module, x, y) -> dict[str, torch.Tensor]:
    net.zero_grad()
    F.cross_entropy(net(x), y).backward()
    return {n: p.grad.clone() for n, p in net.named_parameters()}


# ---- the map ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "a, lam, n",
    [(1.0, 1.0, 1), (1.0, 1.0, 2), (0.5, 2.0, 3), (0.0, 0.7, 2), (0.0, 0.7, 3), (0.0, 1.3, 8),
     (2.5, 0.0, 5), (0.2, 0.0, 2), (1.0, 3.0, 7), (0.3, 0.05, 16)],
)  # fmt: skip
def test_map_equals_dense_solve(a, lam, n):
    g = torch.randn(n, 3, 2, 2, dtype=F64, generator=torch.Generator().manual_seed(n))
    got = channel_directed(g, a=a, smoothing=lam, dim=0)
    torch.testing.assert_close(got, dense_cdg(g, a, lam), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dim", [1, 2, -1])
def test_map_along_other_dims_equals_dense_solve(dim):
    g = torch.randn(3, 6, 5, 4, dtype=F64)
    got = channel_directed(g, a=0.4, smoothing=1.5, dim=dim)
    torch.testing.assert_close(got, dense_cdg(g, 0.4, 1.5, dim=dim), rtol=0, atol=1e-12)


def test_several_dims_is_the_kronecker_metric():
    g = torch.randn(2, 3, 3, 4, dtype=F64)
    got = channel_directed(g, a=0.6, smoothing=0.8, dim=(2, 3))
    torch.testing.assert_close(got, dense_kron(g, 0.6, 0.8), rtol=0, atol=1e-12)


def test_identity_setting_returns_the_input_bit_for_bit():
    g = torch.randn(7, 3, 3, 3)
    out = channel_directed(g, a=1.0, smoothing=0.0)
    assert torch.equal(out, g)


@pytest.mark.parametrize("a, lam", [(1.0, 1.0), (0.0, 2.0), (3.0, 0.0)])
def test_length_one_axis_is_unchanged(a, lam):
    g = torch.randn(1, 4, 3, 3, dtype=F64)
    assert torch.equal(channel_directed(g, a=a, smoothing=lam), g)


def test_constant_along_output_axis_is_kept():
    # P keeps the mean over o; a fibre that is constant is all mean.
    x = torch.randn(1, 3, 3, 3, dtype=F64)
    g = x.expand(9, -1, -1, -1).contiguous()
    out = channel_directed(g, a=0.2, smoothing=3.0)
    torch.testing.assert_close(out, g, rtol=0, atol=1e-13)


def test_only_the_output_axis_mixes():
    # g = e_o ⊗ X: every fibre along dim 0 is X[i, k]·e_o, so the result is (M⁻¹ e_o) ⊗ X.
    n, o = 6, 2
    x = torch.randn(4, 3, 3, dtype=F64)
    g = torch.zeros(n, 4, 3, 3, dtype=F64)
    g[o] = x
    column = torch.linalg.inv(metric(n, 0.5, 1.2))[:, o]
    expected = column.view(n, 1, 1, 1) * x
    out = channel_directed(g, a=0.5, smoothing=1.2)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-13)


def test_mean_over_output_channels_is_preserved_and_fluctuation_smoothed():
    g = torch.randn(16, 5, dtype=F64)
    out = channel_directed(g, a=1.0, smoothing=2.0)
    torch.testing.assert_close(out.mean(0), g.mean(0), rtol=0, atol=1e-13)
    # a low-pass: the zero-mean part shrinks in norm (every eigenvalue of M there is > 1)
    assert (out - out.mean(0)).norm() < (g - g.mean(0)).norm()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32_and_cast_back(dtype):
    g64 = torch.randn(8, 4, 3, 3, dtype=F64)
    g = g64.to(dtype)
    out = channel_directed(g, a=0.5, smoothing=1.0)
    assert out.dtype == dtype
    ref = dense_cdg(g.to(F64), 0.5, 1.0)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out.to(F64), ref, rtol=4 * eps, atol=4 * eps * ref.abs().max())


def test_map_rejects_bad_arguments():
    g = torch.randn(3, 2)
    with pytest.raises(ValueError, match="smoothing"):
        channel_directed(g, smoothing=-1.0)
    with pytest.raises(ValueError, match="dim 2 is out of range"):
        channel_directed(g, dim=2)
    with pytest.raises(TypeError, match="floating"):
        channel_directed(torch.ones(3, 2, dtype=torch.int64))


# ---- the transform on a model ----------------------------------------------------------------
def test_weight_grad_after_backward_equals_cdg_of_plain_grad():
    net = conv_net()
    plain = copy.deepcopy(net)
    cdg = ChannelDirectedGradients(net, a=0.7, smoothing=1.3)
    assert sorted(cdg.parameters) == ["0", "3"]  # 3x3 and 1x1 conv, not BN or Linear
    x, y = batch()
    got, raw = grads(net, x, y), grads(plain, x, y)
    for name in raw:
        if name in ("0.weight", "3.weight"):
            expected = dense_cdg(raw[name], 0.7, 1.3)
            torch.testing.assert_close(got[name], expected, rtol=0, atol=1e-13)
            assert not torch.allclose(got[name], raw[name])
        else:
            assert torch.equal(got[name], raw[name]), name  # biases, BN, Linear untouched


def test_accumulated_gradient_is_cdg_of_the_sum():
    net = conv_net()
    plain = copy.deepcopy(net)
    ChannelDirectedGradients(net, a=0.4, smoothing=0.9)
    (x1, y1), (x2, y2) = batch(1), batch(2)
    for model in (net, plain):
        model.zero_grad()
        F.cross_entropy(model(x1), y1).backward()
        F.cross_entropy(model(x2), y2).backward()
    expected = dense_cdg(plain[0].weight.grad, 0.4, 0.9)
    torch.testing.assert_close(net[0].weight.grad, expected, rtol=0, atol=1e-13)


@pytest.mark.parametrize("axis", ["input", "spatial"])
def test_other_axes_mix_their_own_dims(axis):
    net = conv_net()
    plain = copy.deepcopy(net)
    ChannelDirectedGradients(net, a=0.5, smoothing=1.0, axis=axis)
    x, y = batch()
    got, raw = grads(net, x, y), grads(plain, x, y)
    if axis == "input":
        expected = dense_cdg(raw["0.weight"], 0.5, 1.0, dim=1)
    else:
        expected = dense_kron(raw["0.weight"], 0.5, 1.0)
    torch.testing.assert_close(got["0.weight"], expected, rtol=0, atol=1e-13)
    # the 1x1 conv has no spatial extent: axis="spatial" leaves it as it was
    if axis == "spatial":
        assert torch.equal(got["3.weight"], raw["3.weight"])


def test_linear_opt_in_and_transposed_conv_output_dim():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.ConvTranspose2d(2, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 7 * 7, 4)
    ).to(F64)
    plain = copy.deepcopy(net)
    cdg = ChannelDirectedGradients(net, a=0.3, smoothing=0.6, layers=("conv", "linear"))
    assert sorted(cdg.parameters) == ["0", "3"]
    x, y = batch(n=3)
    x = x[:, :, :5, :5]
    y = y % 4
    got, raw = grads(net, x, y), grads(plain, x, y)
    # ConvTranspose2d stores (in, out, kh, kw): its output channels are dim 1
    expected_t = dense_cdg(raw["0.weight"], 0.3, 0.6, dim=1)
    torch.testing.assert_close(got["0.weight"], expected_t, rtol=0, atol=1e-13)
    expected_l = dense_cdg(raw["3.weight"], 0.3, 0.6, dim=0)
    torch.testing.assert_close(got["3.weight"], expected_l, rtol=0, atol=1e-13)


def test_include_exclude_and_predicate_select_layers():
    net = conv_net()
    for selection, expected in [
        (dict(include=["3"]), ["3"]),
        (dict(exclude="3"), ["0"]),
        (dict(include=lambda n, m: m.kernel_size == (3, 3)), ["0"]),
        (dict(include="[0-9]"), ["0", "3"]),
    ]:
        cdg = ChannelDirectedGradients(net, **selection)
        assert sorted(cdg.parameters) == expected, selection
        cdg.remove()


def test_wrapped_model_is_keyed_by_unwrapped_names():
    cdg = ChannelDirectedGradients(nn.DataParallel(conv_net()))
    assert sorted(cdg.parameters) == ["0", "3"]


def test_remove_restores_plain_gradients_and_is_idempotent():
    net = conv_net()
    plain = copy.deepcopy(net)
    cdg = ChannelDirectedGradients(net, smoothing=2.0)
    cdg.remove()
    cdg.remove()
    x, y = batch()
    got, raw = grads(net, x, y), grads(plain, x, y)
    for name in raw:
        assert torch.equal(got[name], raw[name]), name
    assert not cdg.attached
    ChannelDirectedGradients(net)  # re-attaching after remove is allowed


def test_context_manager_removes():
    net = conv_net()
    with ChannelDirectedGradients(net) as cdg:
        assert cdg.attached
    assert not cdg.attached


def test_state_round_trip_and_validation():
    net = conv_net()
    cdg = ChannelDirectedGradients(net, a=0.5, smoothing=2.0, axis="input")
    buffer = io.BytesIO()
    torch.save(cdg.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer)
    assert state["settings"]["a"] == 0.5 and state["settings"]["smoothing"] == 2.0
    assert state["settings"]["axis"] == "input"
    twin = ChannelDirectedGradients(conv_net(), a=0.5, smoothing=2.0, axis="input")
    twin.load_state_dict(state)
    other = ChannelDirectedGradients(conv_net(), a=0.5, smoothing=1.0, axis="input")
    with pytest.raises(ValueError, match="smoothing"):
        other.load_state_dict(state)
    fewer = ChannelDirectedGradients(conv_net(), a=0.5, smoothing=2.0, axis="input", include="0")
    with pytest.raises(ValueError, match="layers differ"):
        fewer.load_state_dict(state)
    with pytest.raises(ValueError, match="missing keys"):
        twin.load_state_dict({"settings": state["settings"]})
    with pytest.raises(TypeError, match="mapping"):
        twin.load_state_dict([1, 2])


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(a=-0.1), ValueError, "a must be"),
        (dict(smoothing=float("nan")), ValueError, "smoothing"),
        (dict(a=0.0, smoothing=0.0), ValueError, "a \\+ smoothing"),
        (dict(a=True), TypeError, "a must be a real number"),
        (dict(axis="kernel"), ValueError, "'output', 'input', 'spatial'"),
        (dict(layers=("conv", "bn")), ValueError, "layers"),
        (dict(layers=()), ValueError, "layers"),
        (dict(axis="spatial", layers=("conv", "linear")), ValueError, "axis='spatial'"),
        (dict(mode="update"), ValueError, "optimizer"),
        (dict(mode="sideways"), ValueError, "mode"),
    ],
)
def test_bad_arguments_raise_naming_the_culprit(kwargs, error, words):
    with pytest.raises(error, match=words):
        ChannelDirectedGradients(conv_net(), **kwargs)


def test_model_without_eligible_layer_names_the_model():
    class OnlyLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

    with pytest.raises(ValueError, match="OnlyLinear"):
        ChannelDirectedGradients(OnlyLinear())
    with pytest.raises(TypeError, match="nn.Module"):
        ChannelDirectedGradients("not a model")


def test_ineligible_layers_asked_for_by_name_raise():
    net = conv_net()
    nn.utils.parametrizations.weight_norm(net[0])
    with pytest.raises(ValueError, match="parametrized.*'0'"):
        ChannelDirectedGradients(net, include=["0"])
    assert "parametrized" in ChannelDirectedGradients(net).skipped["0"]


def test_shared_weights_and_double_attach_raise():
    first, second = nn.Conv2d(2, 2, 3), nn.Conv2d(2, 2, 3)
    second.weight = first.weight
    with pytest.raises(ValueError, match="share one weight"):
        ChannelDirectedGradients(nn.Sequential(first, second))
    net = conv_net()
    ChannelDirectedGradients(net)
    with pytest.raises(ValueError, match="already has"):
        ChannelDirectedGradients(net)


def test_docstring_examples_run():
    result = doctest.testmod(gradshape.channel)
    assert result.attempted > 0 and result.failed == 0
