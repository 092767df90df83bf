"""Structural reparameterization: fusion maps, blocks, convert/fuse, Lemma 1 against SGS."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradshape as gs
from gradshape import reparam
from gradshape.reparam.fusion import (
    avg_pool_kernel,
    fold_batchnorm,
    identity_kernel,
    merge_sequential,
    pad_to_kernel,
)

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random running statistics and affine weights in every BatchNorm2d; returns ``model``."""
    g = gen(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                shape = m.running_mean.shape
                m.running_mean.copy_(torch.randn(shape, generator=g))
                m.running_var.copy_(torch.rand(shape, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(shape, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(shape, generator=g))
    return model


# ---- fusion maps ----------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_fold_batchnorm_equals_conv_then_bn(bias, affine):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2, bias=bias).double()
    bn = nn.BatchNorm2d(6, affine=affine, eps=1e-3).double()
    randomise_bn(bn)
    bn.eval()
    x = torch.randn(2, 4, 5, 5, dtype=F64)
    kernel, b = fold_batchnorm(conv.weight, conv.bias, bn)
    direct = bn(conv(x))
    folded = F.conv2d(x, kernel, b, padding=1, groups=2)
    torch.testing.assert_close(folded, direct, rtol=1e-12, atol=1e-12)


def test_fold_batchnorm_needs_running_statistics():
    bn = nn.BatchNorm2d(3, track_running_stats=False)
    with pytest.raises(ValueError, match="track_running_stats"):
        fold_batchnorm(torch.ones(3, 1, 3, 3), None, bn)


@pytest.mark.parametrize("small", [(1, 3), (3, 1), (1, 1), (3, 3)])
@pytest.mark.parametrize("stride", [1, 2])
def test_pad_to_kernel_equals_the_smaller_conv(small, stride):
    g = gen(1)
    x = torch.randn(2, 3, 9, 8, generator=g, dtype=F64)
    w = torch.randn(4, 3, *small, generator=g, dtype=F64)
    big = (5, 5)
    # the small kernel, aligned with the centre of a 5x5 conv with padding 2
    direct = F.conv2d(
        x, w, stride=stride, padding=(2 - (5 - small[0]) // 2, 2 - (5 - small[1]) // 2)
    )
    padded = F.conv2d(x, pad_to_kernel(w, big), stride=stride, padding=2)
    torch.testing.assert_close(padded, direct, rtol=0, atol=1e-12)


def test_pad_to_kernel_rejects_uncentrable_sizes():
    with pytest.raises(ValueError, match="centred"):
        pad_to_kernel(torch.ones(1, 1, 2, 3), (3, 3))


@pytest.mark.parametrize("groups", [1, 2, 6])
@pytest.mark.parametrize("size", [(3, 3), (5, 3)])
def test_identity_kernel_is_the_identity(groups, size):
    x = torch.randn(2, 6, 7, 7, generator=gen(2), dtype=F64)
    kernel = identity_kernel(6, groups, size, dtype=F64)
    y = F.conv2d(x, kernel, padding=(size[0] // 2, size[1] // 2), groups=groups)
    assert torch.equal(y, x)


@pytest.mark.parametrize(("groups", "stride", "padding"), [(1, 1, 1), (2, 2, 1), (6, 1, 0)])
def test_avg_pool_kernel_equals_avg_pool(groups, stride, padding):
    x = torch.randn(2, 6, 8, 7, generator=gen(3), dtype=F64)
    kernel = avg_pool_kernel(6, groups, (3, 3), dtype=F64)
    y = F.conv2d(x, kernel, stride=stride, padding=padding, groups=groups)
    pooled = F.avg_pool2d(x, 3, stride, padding, count_include_pad=True)
    torch.testing.assert_close(y, pooled, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(("groups", "stride", "size"), [(1, 1, 3), (2, 2, 3), (3, 1, 5)])
def test_merge_sequential_equals_pad_1x1_kxk(groups, stride, size):
    g = gen(4)
    c, d, e, p = 6, 4 * groups, 3 * groups, size // 2
    x = torch.randn(2, c, 7, 8, generator=g, dtype=F64)
    w1 = torch.randn(d, c // groups, 1, 1, generator=g, dtype=F64)
    b1 = torch.randn(d, generator=g, dtype=F64)
    w2 = torch.randn(e, d // groups, size, size, generator=g, dtype=F64)
    b2 = torch.randn(e, generator=g, dtype=F64)
    # padding applied before the biased 1x1: the border of the middle map carries b1
    direct = F.conv2d(
        F.conv2d(F.pad(x, (p,) * 4), w1, b1, groups=groups), w2, b2, stride, 0, 1, groups
    )
    kernel, bias = merge_sequential(w1, b1, w2, b2, groups)
    merged = F.conv2d(x, kernel, bias, stride, p, 1, groups)
    torch.testing.assert_close(merged, direct, rtol=1e-12, atol=1e-11)


def test_pad_after_pointwise_pads_as_if_before_the_bn():
    torch.manual_seed(5)
    bn = nn.BatchNorm2d(4).double()
    randomise_bn(bn)
    layer = reparam.PadAfterPointwise((1, 2), "zeros", bn).eval()
    y = torch.randn(2, 4, 5, 5, dtype=F64)
    torch.testing.assert_close(layer(y), bn.eval()(F.pad(y, (2, 2, 1, 1))), rtol=1e-12, atol=1e-12)


# ---- blocks ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["acb", "repvgg"])
@pytest.mark.parametrize("size", [3, 5, 7, (3, 5)])
def test_block_masks_sum_to_branch_scaling(kind, size):
    block = reparam.KINDS[kind](4, 4, size, bn="after_sum")
    scaling = gs.masks_to_scaling(block.branch_masks())
    torch.testing.assert_close(scaling, gs.branch_scaling(kind, size), rtol=0, atol=0)


def sample_net(bias: bool, size: int) -> nn.Sequential:
    """Convs covering the supported cases: K, stride 2, groups, depthwise, padding != K//2,
    reflect padding, in == out (RepVGG's identity), each followed by a BatchNorm."""
    p = size // 2
    layers = [
        (nn.Conv2d(3, 6, size, padding=p, bias=bias), 6),
        (nn.Conv2d(6, 6, size, padding=p, groups=2, bias=bias), 6),
        (nn.Conv2d(6, 6, size, stride=2, padding=p, groups=6, bias=bias), 6),
        (nn.Conv2d(6, 8, size, padding=p + 1, padding_mode="reflect", bias=bias), 8),
        (nn.Conv2d(8, 8, size, padding=0, bias=bias), 8),
    ]
    modules: list[nn.Module] = []
    for conv, ch in layers:
        modules += [conv, nn.BatchNorm2d(ch), nn.ReLU()]
    return nn.Sequential(*modules)


def sgd_steps(model: nn.Module, x: torch.Tensor, steps: int = 3) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(steps):
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("kind", sorted(reparam.KINDS))
@pytest.mark.parametrize("bn", reparam.BN_MODES)
@pytest.mark.parametrize(("size", "bias"), [(3, True), (5, False), (7, True)])
def test_convert_train_fuse_keeps_the_function(kind, bn, size, bias):
    torch.manual_seed(size)
    x = torch.randn(3, 3, 2 * size + 3, 2 * size + 3, dtype=F64)
    conversion = reparam.convert(sample_net(bias, size).double(), kind, bn=bn, init="fresh")
    assert len(conversion.converted) == 5 and not conversion.skipped
    model = conversion.model
    sgd_steps(model, x)
    randomise_bn(model, seed=size)
    fused = reparam.fuse(model)
    assert not any(isinstance(m, reparam.ReparamBlock) for m in fused.modules())
    assert any(isinstance(m, reparam.ReparamBlock) for m in model.modules())  # not in place
    with torch.no_grad():
        scale = float(model.eval()(x).abs().max())
    assert reparam.max_output_difference(model, fused, x) <= 1e-12 * scale


@pytest.mark.parametrize("kind", sorted(reparam.KINDS))
def test_fuse_in_float32_is_within_round_off(kind):
    torch.manual_seed(7)
    x = torch.randn(4, 3, 12, 12)
    model = reparam.convert(sample_net(True, 3), kind, init="fresh").model
    sgd_steps(model, x)
    randomise_bn(model)
    fused = reparam.fuse(model)
    with torch.no_grad():
        scale = float(model.eval()(x).abs().max())
    assert reparam.max_output_difference(model, fused, x) <= 1e-5 * scale


@pytest.mark.parametrize("kind", sorted(reparam.KINDS))
@pytest.mark.parametrize("bn", reparam.BN_MODES)
def test_preserve_init_keeps_the_function_in_both_modes(kind, bn):
    torch.manual_seed(8)
    original = sample_net(True, 3).double()
    randomise_bn(original)
    converted = reparam.convert(original, kind, bn=bn).model
    x = torch.randn(4, 3, 9, 9, dtype=F64)
    assert reparam.max_output_difference(original, converted, x) <= 1e-12
    original.train()
    converted.train()
    with torch.no_grad():
        torch.testing.assert_close(converted(x), original(x), rtol=1e-10, atol=1e-10)
    fresh = reparam.convert(original, kind, bn=bn, init="fresh").model
    assert reparam.max_output_difference(original, fresh, x) > 1e-3


@pytest.mark.parametrize("kind", sorted(reparam.KINDS))
def test_equivalent_kernel_is_differentiable_and_follows_dtype(kind):
    block = reparam.KINDS[kind](4, 4, 3).double()
    kernel, bias = block.get_equivalent_kernel_bias()
    assert kernel.dtype == F64 and bias.dtype == F64 and kernel.shape == (4, 4, 3, 3)
    (kernel.square().sum() + bias.sum()).backward()
    for name, p in block.named_parameters():
        if name.endswith("conv.weight") or name.endswith("spatial.weight"):
            assert p.grad is not None and bool(p.grad.abs().sum() > 0), name


def test_from_conv_keeps_device_and_dtype_and_validates():
    conv = nn.Conv2d(4, 4, 3, padding="same", dtype=F64)
    block = reparam.RepVGGBlock.from_conv(conv, mode="after_sum")
    assert block.identity_kernel.dtype == F64 and block.padding == (1, 1)
    with pytest.raises(ValueError, match="per_branch"):
        reparam.ACBlock.from_conv(conv)  # per_branch without a BatchNorm
    with pytest.raises(ValueError, match="stays after the block"):
        reparam.ACBlock.from_conv(conv, nn.BatchNorm2d(4), mode="after_sum")
    with pytest.raises(ValueError, match="even"):
        reparam.ACBlock.from_conv(nn.Conv2d(4, 4, 4), mode="after_sum")
    with pytest.raises(ValueError, match="divisible by groups"):
        reparam.DiverseBranchBlock(4, 6, 3, groups=4)
    with pytest.raises(ValueError, match="odd"):
        reparam.ACBlock(4, 4, 2)


# ---- which BatchNorm follows which conv -------------------------------------------------------
class ResidualBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv3 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        z = self.conv2(y)  # also used by the residual sum: not "directly followed" by bn2
        return self.conv3(self.bn2(z) + z + x)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow defeats torch.fx
            return self.body(x)
        return -self.body(x)


def test_following_batchnorms_by_graph_also_inside_an_untraceable_model():
    assert reparam.following_batchnorms(ResidualBlock()) == {"conv1": "bn1"}
    assert reparam.following_batchnorms(Untraceable()) == {"body.0": "body.1"}
    with pytest.warns(UserWarning, match="conv2: no BatchNorm2d directly follows"):
        conversion = reparam.convert(ResidualBlock(), "acb")
    assert conversion.converted == ("conv1",)
    assert isinstance(conversion.model.bn1, nn.Identity)


# ---- Lemma 1: after_sum blocks train exactly like SGS with G = Σ masks ------------------------
def lemma_net(size: int) -> nn.Sequential:
    torch.manual_seed(size)
    p = size // 2
    return nn.Sequential(
        nn.Conv2d(3, 6, size, padding=p, bias=True),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 6, size, padding=p, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 6, size, stride=2, padding=p, groups=2, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 4),
    ).double()


def train_sgd(model, steps, *, weight_decay=1e-3, sgs_kind=None, size=3, seed=11):
    """SGD with Nesterov momentum and weight decay on fixed random batches; with ``sgs_kind``
    every conv's gradient is scaled by ``gs.branch_scaling(sgs_kind, size)``."""
    if sgs_kind is not None:
        sgs = gs.SpatialGradientScaling(model)
        for name in sgs.scalings:
            sgs.set_scaling(name, gs.branch_scaling(sgs_kind, size))
    opt = torch.optim.SGD(
        model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=weight_decay
    )
    g = gen(seed)
    data = torch.randn(64, 3, 10, 10, generator=g, dtype=F64)
    target = torch.randint(0, 4, (64,), generator=g)
    model.train()
    for step in range(steps):
        i = (step * 16) % 64
        loss = F.cross_entropy(model(data[i : i + 16]), target[i : i + 16])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def merged_kernels(model: nn.Module, fold: bool = False) -> torch.Tensor:
    """Every conv's (block's merged) kernel, flattened; with ``fold`` each BatchNorm that
    follows in the Sequential (per branch: the one inside the block) is folded in, i.e. the
    deployed kernel."""
    out = []
    children = list(model)
    for i, m in enumerate(children):
        if isinstance(m, reparam.ReparamBlock):
            kernel, bias = m.get_equivalent_kernel_bias()
            after = children[i + 1] if m.bn == "after_sum" else None
        elif isinstance(m, nn.Conv2d):
            kernel, bias, after = m.weight, m.bias, children[i + 1]
        else:
            continue
        if fold and after is not None:
            kernel, bias = fold_batchnorm(kernel, bias, after)
        out.append(kernel.detach().flatten())
    return torch.cat(out)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("size", [3, 5])
def test_lemma1_acb_after_sum_follows_sgs(size):
    base = lemma_net(size)
    structure = reparam.convert(base, "acb", bn="after_sum").model
    train_sgd(structure, 32, size=size)
    scaled = train_sgd(copy.deepcopy(base), 32, sgs_kind="acb", size=size)
    plain = train_sgd(copy.deepcopy(base), 32, size=size)
    k_struct, k_sgs = merged_kernels(structure), merged_kernels(scaled)
    assert float((k_struct - k_sgs).abs().max()) <= 1e-10 * float(k_sgs.abs().max())
    torch.testing.assert_close(structure[-1].weight, scaled[-1].weight, rtol=1e-10, atol=1e-12)
    assert relative(k_struct, merged_kernels(plain)) > 1e-2  # the scaling matters


def test_repvgg_after_sum_follows_sgs_without_weight_decay_only():
    """The identity branch is a constant inside the merged kernel W = W_dense + W_1x1 + I:
    weight decay shrinks W − I, so Lemma 1 holds for RepVGG without weight decay only."""
    base = lemma_net(3)
    distances = {}
    for wd in (0.0, 1e-2):
        structure = reparam.convert(base, "repvgg", bn="after_sum").model
        train_sgd(structure, 32, weight_decay=wd)
        scaled = train_sgd(copy.deepcopy(base), 32, weight_decay=wd, sgs_kind="repvgg")
        distances[wd] = relative(merged_kernels(structure), merged_kernels(scaled))
    assert distances[0.0] <= 1e-12
    assert distances[1e-2] > 1e-4


def test_dbb_after_sum_first_step_is_a_scaling_plus_a_low_pass_term():
    """From the function-preserving start (seq: 1×1 = I, K×K = 0; avg: 1×1 = 0), one plain SGD
    step moves the merged kernel by −lr·[(2·full + centre) ⊙ g + mean_hw(g) / K²]:
    dense and seq contribute g each, the 1×1 branch g at the centre, and the pooling branch
    only the spatial mean of g divided by K² (not a mask)."""
    size, lr = 3, 0.1
    torch.manual_seed(12)
    plain = nn.Sequential(nn.Conv2d(3, 4, size, padding=1), nn.BatchNorm2d(4)).double()
    structure = reparam.convert(plain, "dbb", bn="after_sum").model
    x = torch.randn(8, 3, 6, 6, dtype=F64)
    plain(x).sin().sum().backward()
    g = plain[0].weight.grad
    before = structure[0].get_equivalent_kernel_bias()[0].detach()
    structure(x).sin().sum().backward()
    torch.optim.SGD(structure.parameters(), lr=lr).step()
    after = structure[0].get_equivalent_kernel_bias()[0].detach()
    scaling = torch.full((size, size), 2.0, dtype=F64)
    scaling[size // 2, size // 2] += 1
    torch.testing.assert_close(gs.branch_scaling("dbb", size), scaling)  # SGS's DBB stand-in
    expected = -lr * (scaling * g + g.mean((2, 3), keepdim=True) / size**2)
    torch.testing.assert_close(after - before, expected, rtol=1e-10, atol=1e-13)


def test_per_branch_drift(capsys):
    """Per-branch BatchNorm is not Lemma 1's form: measure how far the structure's deployed
    kernels drift from SGS with G = Σ masks (and from plain training) over 50 steps."""
    base = lemma_net(3)
    rows = {}
    for kind, bn in [
        ("acb", "after_sum"),
        ("acb", "per_branch"),
        ("repvgg", "per_branch"),
        ("dbb", "per_branch"),
    ]:
        structure = train_sgd(reparam.convert(base, kind, bn=bn).model, 50)
        scaled = train_sgd(copy.deepcopy(base), 50, sgs_kind=kind)
        plain = train_sgd(copy.deepcopy(base), 50)
        k, k_sgs = merged_kernels(structure, fold=True), merged_kernels(scaled, fold=True)
        k_plain = merged_kernels(plain, fold=True)
        rows[kind, bn] = (relative(k, k_sgs), relative(k, k_plain), relative(k_sgs, k_plain))
    with capsys.disabled():
        print("\nrelative distance of deployed kernels after 50 steps:")
        print("  structure  bn          struct-SGS  struct-plain  SGS-plain")
        for (kind, bn), distances in rows.items():
            print(f"  {kind:10s} {bn:11s}" + "".join(f" {d:11.3g}" for d in distances))
    assert rows["acb", "after_sum"][0] <= 1e-10
    for key in [("acb", "per_branch"), ("repvgg", "per_branch"), ("dbb", "per_branch")]:
        assert all(torch.isfinite(torch.tensor(rows[key])))
        assert rows[key][0] > 1e3 * rows["acb", "after_sum"][0]


# ---- bad input and reporting ------------------------------------------------------------------
def test_unknown_kind_bn_and_init_are_rejected_with_the_valid_values():
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(ValueError, match=r"'acb', 'dbb', 'repvgg'"):
        reparam.convert(model, "acnet")
    with pytest.raises(ValueError, match="per_branch"):
        reparam.convert(model, "acb", bn="before")
    with pytest.raises(ValueError, match="preserve"):
        reparam.convert(model, "acb", init="zeros")
    with pytest.raises(TypeError, match="nn.Module"):
        reparam.convert("model", "acb")


def test_skipped_convs_are_reported_with_reasons():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),  # 0: no BatchNorm after it
        nn.Conv2d(4, 4, 4),  # 1: even kernel
        nn.BatchNorm2d(4),
        nn.Conv2d(4, 4, 3, dilation=2),  # 3: dilation
        nn.BatchNorm2d(4),
        nn.ConvTranspose2d(4, 4, 3),  # 5: transposed
        nn.BatchNorm2d(4),
        nn.Conv2d(4, 4, 1),  # 7: 1x1
        nn.BatchNorm2d(4),
        nn.Conv2d(4, 4, 3, padding=1),  # 9: converted
        nn.BatchNorm2d(4),
        nn.Conv2d(4, 4, 3, padding=1),  # 11: excluded
        nn.BatchNorm2d(4),
    )
    with pytest.warns(UserWarning, match="left 5 conv"):
        conversion = reparam.convert(model, "repvgg", exclude="11")
    reasons = dict(conversion.skipped)
    assert conversion.converted == ("9",)
    assert "no BatchNorm2d" in reasons["0"]
    assert "even size" in reasons["1"]
    assert "dilation" in reasons["3"]
    assert "transposed" in reasons["5"]
    assert "(1, 1)" in reasons["7"]
    assert reasons["11"] == "excluded"
    assert isinstance(conversion.model[10], nn.Identity)
    assert isinstance(model[9], nn.Conv2d)  # the original is untouched
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        after_sum = reparam.convert(model, "acb", bn="after_sum", include=["0", "9"])
    assert after_sum.converted == ("0", "9") and not after_sum.skipped


def test_convert_in_place_and_twice():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    result = reparam.convert(model, "dbb", inplace=True)
    assert result.model is model and isinstance(model[0], reparam.DiverseBranchBlock)
    with pytest.warns(UserWarning, match="already inside"):
        again = reparam.convert(model, "acb", bn="after_sum")
    assert not again.converted


def test_a_model_that_is_a_conv_or_a_block():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    block = reparam.convert(conv, "acb", bn="after_sum").model
    assert isinstance(block, reparam.ACBlock)
    fused = reparam.fuse(block)
    assert type(fused) is nn.Conv2d
    x = torch.randn(1, 3, 5, 5)
    assert reparam.max_output_difference(conv, fused, x) < 1e-5


def test_fuse_without_blocks_is_a_no_op():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    state = copy.deepcopy(model.state_dict())
    assert reparam.fuse(model) is model
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])


def test_max_output_difference_restores_modes_and_checks_shapes():
    a = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    b = copy.deepcopy(a)
    b[1].eval()
    x = torch.randn(2, 3, 5, 5)
    assert reparam.max_output_difference(a, b, x) == 0.0
    assert a.training and a[1].training and b.training and not b[1].training
    with pytest.raises(ValueError, match="shapes differ"):
        reparam.max_output_difference(a, nn.Conv2d(3, 2, 3), x)


def test_kinds_are_the_block_classes():
    assert set(reparam.KINDS) == {"acb", "repvgg", "dbb"}
    for kind, cls in reparam.KINDS.items():
        assert cls.kind == kind and issubclass(cls, reparam.ReparamBlock)
    assert reparam.BN_MODES == ("per_branch", "after_sum")
