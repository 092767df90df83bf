"""Architectures: output shapes, parameter counts from layer formulas, BN pairing, conversion."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from gradshape import reparam
from gradshape.harness.models import MODELS, create_model, scaled_channels

# channel plans written out here, independent of the module's tables
VGG_PLANS = {
    "vgg11": [64, 128, 256, 256, 512, 512, 512, 512],
    "vgg13": [64, 64, 128, 128, 256, 256, 512, 512, 512, 512],
    "vgg16": [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512],
    "vgg19": [64, 64, 128, 128, 256, 256, 256, 256, 512, 512, 512, 512, 512, 512, 512, 512],
}
RESNET_BLOCKS = {"resnet18": [2, 2, 2, 2], "resnet34": [3, 4, 6, 3]}


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _vgg_formula(name: str, in_channels: int, classes: int, width: float = 1.0) -> int:
    """Σ conv3×3 with bias (9·c_in·c_out + c_out) + BN (2·c_out), then Linear (c·k + k)."""
    total, c = 0, in_channels
    for out in VGG_PLANS[name]:
        out = max(1, round(out * width))
        total += 9 * c * out + out + 2 * out
        c = out
    return total + c * classes + classes


def _resnet_formula(name: str, in_channels: int, classes: int, stem: int, width=1.0) -> int:
    """Stem conv (stem²·c_in·64, no bias) + BN; per basic block two 3×3 convs + BNs and, where
    the shape changes, a 1×1 conv + BN; then Linear."""
    w = [max(1, round(c * width)) for c in (64, 128, 256, 512)]
    total = stem * stem * in_channels * w[0] + 2 * w[0]
    c = w[0]
    for stage, (count, out) in enumerate(zip(RESNET_BLOCKS[name], w)):
        for block in range(count):
            total += 9 * c * out + 2 * out + 9 * out * out + 2 * out
            if block == 0 and (stage > 0 or c != out):
                total += c * out + 2 * out
            c = out
    return total + c * classes + classes


def test_published_parameter_counts():
    assert _vgg_formula("vgg16", 3, 10) == 14_728_266
    assert _count(create_model("vgg16", num_classes=10, in_channels=3)) == 14_728_266
    assert _resnet_formula("resnet18", 3, 10, stem=3) == 11_173_962
    assert _count(create_model("resnet18", num_classes=10, in_channels=3)) == 11_173_962
    assert _resnet_formula("resnet18", 3, 1000, stem=7) == 11_689_512
    imagenet = create_model("resnet18-imagenet", num_classes=1000, in_channels=3)
    assert _count(imagenet) == 11_689_512


@pytest.mark.parametrize("width", [0.25, 0.3, 0.5])
@pytest.mark.parametrize("name", MODELS)
def test_width_scales_every_channel_count(name, width):
    model = create_model(name, num_classes=7, in_channels=2, width=width)
    if name.startswith("vgg"):
        expected = _vgg_formula(name, 2, 7, width)
    elif name.startswith("resnet"):
        base = name.removesuffix("-imagenet")
        expected = _resnet_formula(base, 2, 7, 7 if "imagenet" in name else 3, width)
    else:  # tiny: 8, 16, 32 channels, convs without bias
        c1, c2, c3 = (max(1, round(c * width)) for c in (8, 16, 32))
        expected = 9 * (2 * c1 + c1 * c2 + c2 * c3) + 2 * (c1 + c2 + c3) + c3 * 7 + 7
    assert _count(model) == expected
    pooled = create_model(name, num_classes=7, in_channels=2, width=width, drop_last_pool=True)
    assert _count(pooled) == expected


def test_scaled_channels_rounding():
    assert [scaled_channels(64, w) for w in (1.0, 0.25, 0.3, 0.001)] == [64, 16, 19, 1]
    assert scaled_channels(10, 0.25) == 2  # round half to even: 2.5 → 2


@pytest.mark.parametrize("drop_last_pool", [False, True])
@pytest.mark.parametrize("name", MODELS)
def test_output_shapes_on_small_inputs(name, drop_last_pool):
    torch.manual_seed(0)
    width = 0.5 if name == "tiny" else 0.0625
    for side, channels in ((8, 1), (28, 1), (32, 3)):
        model = create_model(
            name, num_classes=5, in_channels=channels, width=width, drop_last_pool=drop_last_pool
        )
        out = model(torch.randn(2, channels, side, side))
        assert out.shape == (2, 5) and torch.isfinite(out).all()


def _feature_sides(model: nn.Module, side: int) -> list[int]:
    """Side length of the map each conv sees, in call order."""
    sides: list[int] = []
    hooks = [
        m.register_forward_hook(lambda m, i, o: sides.append(i[0].shape[-1]))
        for m in model.modules()
        if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)
    ]
    model(torch.randn(2, 1, side, side))
    for h in hooks:
        h.remove()
    return sides


def test_drop_last_pool_doubles_the_deepest_maps():
    vgg = create_model("vgg11", num_classes=3, in_channels=1, width=0.0625)
    dropped = create_model("vgg11", num_classes=3, in_channels=1, width=0.0625, drop_last_pool=True)
    # pools: 32 → 16 → 8 → 4 → 2 (→ 1 after the last conv)
    assert _feature_sides(vgg, 32) == [32, 16, 8, 8, 4, 4, 2, 2]
    assert _feature_sides(dropped, 32) == [32, 16, 8, 8, 4, 4, 4, 4]
    # ceil-mode pools on 28 and 8: 28 → 14 → 7 → 4 → 2 (→ 1), 8 → 4 → 2 → 1 → 1 (→ 1)
    assert _feature_sides(vgg, 28) == [28, 14, 7, 7, 4, 4, 2, 2]
    assert _feature_sides(vgg, 8) == [8, 4, 2, 2, 1, 1, 1, 1]
    assert _feature_sides(dropped, 8) == [8, 4, 2, 2, 1, 1, 1, 1]
    res = create_model("resnet18", num_classes=3, in_channels=1, width=0.0625)
    res_dropped = create_model(
        "resnet18", num_classes=3, in_channels=1, width=0.0625, drop_last_pool=True
    )
    assert _feature_sides(res, 32)[-4:] == [8, 4, 4, 4]  # layer4: stride 2
    assert _feature_sides(res_dropped, 32)[-4:] == [8, 8, 8, 8]  # layer4: stride 1


@pytest.mark.parametrize("name", MODELS)
def test_every_conv_is_paired_with_a_batchnorm_and_traceable(name):
    model = create_model(name, num_classes=4, in_channels=3, width=0.0625)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    pairs = reparam.following_batchnorms(model)  # found through the torch.fx graph
    assert sorted(pairs) == sorted(convs)
    modules = dict(model.named_modules())
    assert all(modules[pairs[c]].num_features == modules[c].out_channels for c in convs)
    x = torch.randn(2, 3, 16, 16)
    model.eval()
    torch.testing.assert_close(torch.fx.symbolic_trace(model)(x), model(x))


def test_initialisation():
    torch.manual_seed(3)
    a = create_model("resnet18", num_classes=10, in_channels=3)
    torch.manual_seed(3)
    b = create_model("resnet18", num_classes=10, in_channels=3)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    conv = a.layer4[1].conv2  # kaiming normal, fan_out: std = sqrt(2 / (512·9))
    assert float(conv.weight.detach().std()) == pytest.approx(math.sqrt(2 / (512 * 9)), rel=0.02)
    assert float(conv.weight.detach().mean()) == pytest.approx(0, abs=1e-3)
    assert torch.equal(a.layer4[1].bn2.weight, torch.ones(512))


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown model 'vgg8'") as err:
        create_model("vgg8", num_classes=10, in_channels=3)
    assert all(name in str(err.value) for name in MODELS)
    with pytest.raises(ValueError, match="width must be a finite number > 0"):
        create_model("tiny", num_classes=10, in_channels=3, width=0)
    with pytest.raises(ValueError, match="num_classes must be an int >= 1"):
        create_model("tiny", num_classes=0, in_channels=3)


def _randomise_batchnorms(model: nn.Module, generator: torch.Generator) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=generator)
                m.bias.normal_(0, 0.2, generator=generator)
                m.running_mean.normal_(0, 0.2, generator=generator)
                m.running_var.uniform_(0.5, 1.5, generator=generator)


@pytest.mark.parametrize("name", ["vgg11", "resnet18"])
def test_acb_conversion_and_fusion(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=6, in_channels=3, width=0.125)
    _randomise_batchnorms(model, torch.Generator().manual_seed(1))
    convs3 = sorted(
        n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        conversion = reparam.convert(model, "acb")
    assert len(caught) == (name == "resnet18")  # one warning listing the 1×1 shortcuts
    assert sorted(conversion.converted) == convs3
    assert all("kernel (1, 1)" in reason for _, reason in conversion.skipped)
    trained = conversion.model
    _randomise_batchnorms(trained, torch.Generator().manual_seed(2))  # per-branch BNs too
    deployed = reparam.fuse(trained)
    left = [n for n, m in deployed.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert all("shortcut" in n for n in left)  # every 3×3 conv absorbed its BatchNorm
    x = torch.randn(4, 3, 32, 32)
    trained.eval()
    deployed.eval()
    with torch.no_grad():
        ref, out = trained(x), deployed(x)
    assert float((ref - out).abs().max()) <= 1e-4 * float(ref.abs().max())
