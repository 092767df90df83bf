"""reparam on model code written elsewhere (issue 15): converted blocks answer like the conv
they replace, BatchNorms are found in the traceable parts of untraceable models, and conv
subclasses convert when they compute Conv2d's own convolution."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradshape as gs
from gradshape import reparam
from gradshape.selection import forward_override
from test_reparam import randomise_bn

F64 = torch.float64


# ---- layers that read their conv's attributes (fault 4) ---------------------------------------
class TFSamePadLayer(nn.Module):
    """Pads like TensorFlow's "SAME" from its conv's kernel_size, stride and dilation, as
    Hugging Face's MobileNetV2 conv layer does (written here from the formula).  The padding
    depends on the input's size, so torch.fx cannot trace this forward."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.convolution = nn.Conv2d(cin, cout, k, stride, padding=0, groups=groups, bias=False)
        self.normalization = nn.BatchNorm2d(cout)
        self.activation = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.convolution
        pads = []
        for size, k, s, d in zip(x.shape[-2:], conv.kernel_size, conv.stride, conv.dilation):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads.append((total // 2, total - total // 2))
        (top, bottom), (left, right) = pads
        y = conv(F.pad(x, (left, right, top, bottom)))
        return self.activation(self.normalization(y))


class CentredPadLayer(nn.Module):
    """Reflect-pads by d·(K − 1)/2 and keeps the first in_channels channels, all read from its
    conv in forward; traceable (no data-dependent Python)."""

    def __init__(self, cin: int, cout: int, k: int) -> None:
        super().__init__()
        self.convolution = nn.Conv2d(cin, cout, k, bias=True)
        self.normalization = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.convolution
        ph, pw = (d * (k - 1) // 2 for k, d in zip(conv.kernel_size, conv.dilation))
        x = F.pad(x[:, : conv.in_channels], (pw, pw, ph, ph), mode="reflect")
        return self.normalization(conv(x))


def wrapper_net() -> nn.Sequential:
    torch.manual_seed(0)
    return randomise_bn(
        nn.Sequential(
            TFSamePadLayer(3, 6, 3, stride=2),
            TFSamePadLayer(6, 6, 3, groups=6),
            CentredPadLayer(6, 8, 5),
            CentredPadLayer(8, 8, 3),
        ).double()
    )


@pytest.mark.parametrize("kind", sorted(reparam.KINDS))
@pytest.mark.parametrize("bn", reparam.BN_MODES)
def test_layers_reading_conv_attributes_run_after_convert(kind, bn):
    original = wrapper_net()
    x = torch.randn(2, 3, 10, 11, dtype=F64)  # odd/even sides: asymmetric "SAME" padding
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        conversion = reparam.convert(original, kind, bn=bn)
    assert len(caught) == (bn == "per_branch")  # one warning listing the skipped convs
    centred = ("2.convolution", "3.convolution")
    if bn == "after_sum":
        assert conversion.converted == ("0.convolution", "1.convolution", *centred)
    else:  # the TF layers cannot be traced: whether their BatchNorm follows is unknown
        assert conversion.converted == centred
        reasons = dict(conversion.skipped)
        for layer in ("0", "1"):
            assert "cannot tell whether a BatchNorm2d follows it" in reasons[f"{layer}.convolution"]
            assert f"torch.fx cannot trace '{layer}'" in reasons[f"{layer}.convolution"]
    model = conversion.model
    assert reparam.max_output_difference(original, model, x) <= 1e-12
    assert reparam.max_output_difference(original, reparam.fuse(model), x) <= 1e-12


CONVS = [
    dict(in_channels=4, out_channels=6, kernel_size=(3, 5), stride=(2, 1), padding=(1, 3),
         groups=2, bias=True),
    dict(in_channels=4, out_channels=4, kernel_size=3, padding="same", bias=False),
]  # fmt: skip


@pytest.mark.parametrize("kind", sorted(reparam.KINDS))
@pytest.mark.parametrize("bn", reparam.BN_MODES)
@pytest.mark.parametrize("spec", range(len(CONVS)))
def test_block_exposes_the_replaced_convs_attributes_and_equivalent_weight(kind, bn, spec):
    torch.manual_seed(spec)
    conv = nn.Conv2d(**CONVS[spec], dtype=F64)
    norm = nn.BatchNorm2d(conv.out_channels, dtype=F64) if bn == "per_branch" else None
    block = reparam.KINDS[kind].from_conv(conv, norm, mode=bn)
    with torch.no_grad():  # every branch live, BatchNorms with random statistics
        for p in block.parameters():
            p.normal_()
    randomise_bn(block, seed=spec)
    for name in ("in_channels", "out_channels", "groups", "padding_mode"):
        assert getattr(block, name) == getattr(conv, name), name
    for name in ("kernel_size", "stride", "dilation"):
        assert getattr(block, name) == tuple(getattr(conv, name)), name
    assert block.padding == (conv.padding if conv.padding != "same" else (1, 1))

    weight, bias = block.weight, block.bias
    fused = reparam.fuse(block)
    assert torch.equal(weight, fused.weight) and torch.equal(bias, fused.bias)
    assert weight.dtype == F64 and not weight.requires_grad and not bias.requires_grad
    # what they mean: the block in eval mode is the conv with this kernel and bias
    x = torch.randn(2, 4, 9, 8, dtype=F64)
    with torch.no_grad():
        direct = F.conv2d(
            x, weight, bias, block.stride, block.padding, block.dilation, block.groups
        )
        torch.testing.assert_close(block.eval()(x), direct, rtol=1e-12, atol=1e-12)
    with pytest.raises(AttributeError):
        block.weight = torch.zeros_like(weight)
    # not parameters: iteration, state_dict and loading are as before
    names = [n for n, _ in block.named_parameters()] + list(block.state_dict())
    assert not {"weight", "bias"} & set(names)
    copy.deepcopy(block).load_state_dict(block.state_dict())


def test_gradshape_transforms_on_a_converted_model_select_the_branch_convs():
    model = reparam.convert(wrapper_net(), "acb", bn="after_sum").model
    branch_convs = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    sgs = gs.SpatialGradientScaling(model)
    cdg = gs.ChannelDirectedGradients(model)
    try:
        assert set(sgs.modules) | set(sgs.skipped) == branch_convs
        assert set(cdg.modules) | set(cdg.skipped) == branch_convs
    finally:
        sgs.remove()
        cdg.remove()


# ---- which BatchNorm follows, on models torch.fx cannot trace whole (fault 5) -----------------
class ConvLayer(nn.Module):
    """conv → BatchNorm → ReLU, as a library's "conv layer" module."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.convolution = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.normalization = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.normalization(self.convolution(x)))


class GatedNet(nn.Module):
    """Its own forward has data-dependent control flow; its conv layers do not."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvLayer(3, 4)
        self.stages = nn.ModuleList([ConvLayer(4, 4), ConvLayer(4, 4)])
        self.head = nn.Conv2d(4, 4, 3, padding=1)
        self.head_bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            x = x.flip(-1)
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.head_bn(self.head(x))


def test_batchnorms_are_found_in_traceable_submodules_of_an_untraceable_model():
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(GatedNet())
    layers = ["stem", "stages.0", "stages.1"]
    expected = {f"{n}.convolution": f"{n}.normalization" for n in layers}
    assert reparam.following_batchnorms(GatedNet()) == expected
    torch.manual_seed(1)
    original = randomise_bn(GatedNet().double())
    with pytest.warns(UserWarning, match="left 1 conv"):
        conversion = reparam.convert(original, "repvgg")
    assert conversion.converted == tuple(expected)
    ((name, reason),) = conversion.skipped
    assert name == "head"
    assert reason.startswith("cannot tell whether a BatchNorm2d follows it: torch.fx cannot trace")
    assert "the model itself" in reason and "TraceError" in reason and "bn='after_sum'" in reason
    for layer in layers:
        assert isinstance(conversion.model.get_submodule(f"{layer}.normalization"), nn.Identity)
    for sign in (1, -1):  # both branches of the data-dependent forward
        x = sign * torch.rand(2, 3, 7, 7, dtype=F64)
        assert reparam.max_output_difference(original, conversion.model, x) <= 1e-12


class Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.mean() > 0 else -x  # data-dependent: untraceable


class BlockWithGate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.gate = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), Gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(self.bn(self.conv(x)))


class TwiceCalled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(self.conv(x)))


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = TFSamePadLayer(3, 4, 3)
        self.conv, self.gate = nn.Conv2d(4, 4, 3, padding=1), Gate()
        self.block = BlockWithGate()
        self.twice = TwiceCalled()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.twice(self.block(self.gate(self.conv(self.layer(x)))))


def test_untraceable_submodules_give_the_honest_reason():
    with pytest.warns(UserWarning, match="left 3 conv"):
        conversion = reparam.convert(Mixed(), "acb")
    assert conversion.converted == ("block.conv",)  # the gate after its BatchNorm is opaque
    reasons = dict(conversion.skipped)
    inside = reasons["layer.convolution"]
    assert inside.startswith("cannot tell whether a BatchNorm2d follows it: torch.fx cannot")
    assert "trace 'layer' (TraceError" in inside and "bn='after_sum'" in inside
    into = reasons["conv"]
    assert "its output goes into 'gate', which torch.fx cannot trace (TraceError" in into
    assert reasons["twice.conv"].startswith("no BatchNorm2d directly follows it")
    assert reparam.following_batchnorms(Mixed()) == {"block.conv": "block.bn"}


class Repeated(nn.Module):
    """Calls one conv layer twice: each call of its conv feeds only its BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = ConvLayer(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(self.layer(x))


class CalledAround(nn.Module):
    """Also calls the layer's conv directly: that call has no BatchNorm after it."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = ConvLayer(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x) + self.layer.convolution(x)


def test_directly_follows_holds_for_every_call_the_traceable_modules_show():
    pair = {"layer.convolution": "layer.normalization"}
    assert reparam.following_batchnorms(Repeated()) == pair
    assert reparam.following_batchnorms(CalledAround()) == {}  # decided in layer, refuted above
    torch.manual_seed(3)
    original = randomise_bn(Repeated().double())
    converted = reparam.convert(original, "dbb").model
    x = torch.randn(2, 4, 6, 6, dtype=F64)
    assert reparam.max_output_difference(original, converted, x) <= 1e-12
    with torch.no_grad():  # training mode too: the block's own BatchNorm is the original one
        torch.testing.assert_close(converted.train()(x), original.train()(x))


# ---- conv subclasses: one rule with SGS (fault 8) ---------------------------------------------
class DepthwiseConv2d(nn.Conv2d):
    """Only a constructor: computes Conv2d's own convolution."""

    def __init__(self, channels: int, kernel_size: int) -> None:
        super().__init__(
            channels, channels, kernel_size, padding=kernel_size // 2, groups=channels, bias=False
        )


class PadInForward(nn.Conv2d):
    """Overrides forward (pads itself, then convolves without padding)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (1, 1, 1, 1), mode="replicate")
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class DoubledBatchNorm(nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


@pytest.mark.parametrize("kind", sorted(reparam.KINDS))
def test_conv_subclasses_convert_unless_they_override_forward(kind):
    torch.manual_seed(2)
    original = randomise_bn(
        nn.Sequential(
            DepthwiseConv2d(4, 3),
            nn.BatchNorm2d(4),
            PadInForward(4, 4, 3),
            nn.BatchNorm2d(4),
            nn.Conv2d(4, 4, 3, padding=1),
            DoubledBatchNorm(4),
        ).double()
    )
    assert reparam.conversion_obstacle(original[0]) == "" == forward_override(original[0])
    assert "PadInForward overrides forward" in reparam.conversion_obstacle(original[2])
    with pytest.warns(UserWarning, match="left 2 conv"):
        conversion = reparam.convert(original, kind)
    assert conversion.converted == ("0",)
    reasons = dict(conversion.skipped)
    assert reasons["2"] == forward_override(original[2])
    assert "DoubledBatchNorm) overrides forward" in reasons["4"]
    x = torch.randn(2, 4, 6, 6, dtype=F64)
    assert reparam.max_output_difference(original, conversion.model, x) <= 1e-12
    with pytest.raises(ValueError, match="PadInForward overrides forward"):
        reparam.KINDS[kind].from_conv(original[2], mode="after_sum")
    after_sum = reparam.convert(original, kind, bn="after_sum", exclude="2")
    assert after_sum.converted == ("0", "4")
    assert reparam.max_output_difference(original, after_sum.model, x) <= 1e-12


def test_a_frozen_conv_stays_as_it_was():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)
    )
    model[0].requires_grad_(False)  # a frozen stem
    with pytest.warns(UserWarning, match="left 1 conv"):
        conversion = reparam.convert(model, "acb")
    assert conversion.converted == ("2",)
    assert "frozen (requires_grad=False)" in dict(conversion.skipped)["0"]
    stem = conversion.model[0]
    assert type(stem) is nn.Conv2d and not any(p.requires_grad for p in stem.parameters())


def test_one_observed_forward_pairs_what_tracing_cannot():
    """example_inputs: the BatchNorm after each conv is seen in one forward instead."""
    x = torch.randn(2, 3, 10, 11, dtype=F64)
    original = wrapper_net()
    pairs = reparam.following_batchnorms(original, example_inputs=x)
    assert pairs == {f"{i}.convolution": f"{i}.normalization" for i in range(4)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        conversion = reparam.convert(original, "dbb", example_inputs=x)
    assert len(conversion.converted) == 4
    assert reparam.max_output_difference(original, conversion.model, x) <= 1e-12
    assert reparam.max_output_difference(original, reparam.fuse(conversion.model), x) <= 1e-12
    # the rule itself: a conv whose output is used twice, or a conv called twice into one
    # BatchNorm (TwiceCalled: the inner call feeds the conv, not the BatchNorm), is not paired
    mixed = Mixed().double()
    observed = reparam.following_batchnorms(
        mixed, example_inputs=torch.randn(1, 3, 8, 8, dtype=F64)
    )
    assert observed == {"layer.convolution": "layer.normalization", "block.conv": "block.bn"}

    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            y = self.conv(t)
            return self.bn(y) + y

    assert reparam.following_batchnorms(Residual(), example_inputs=torch.randn(1, 3, 5, 5)) == {}
    training = Residual().train()
    before = training.bn.running_mean.clone()
    reparam.following_batchnorms(training, example_inputs=torch.randn(1, 3, 5, 5))
    assert training.training and torch.equal(training.bn.running_mean, before)
