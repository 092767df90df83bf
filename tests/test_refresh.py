"""The refresh measures what each convolution operation really convolves (gradshape.refresh).

Every expectation is computed another way: ``spatial_dependence`` on the tensor and padding
the operation is known (by construction of the test) to convolve.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradshape as gs
from gradshape import refresh
from gradshape.dependence import spatial_dependence


def smooth(n=4, c=3, size=(16, 16), seed=0):
    """Maps with real spatial dependence: upsampled noise plus a little white noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, c, *(s // 4 for s in size), generator=g)
    mode = "linear" if len(size) == 1 else "bilinear"
    up = F.interpolate(coarse, size=size, mode=mode, align_corners=False)
    return up + 0.3 * torch.randn(n, c, *size, generator=g)


def expected_g(maps, kernel, **geometry):
    return gs.dependence_to_scaling(spatial_dependence(maps, kernel, **geometry)).float()


def same(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---- padding and weights the operation sees -------------------------------------------------
class Conv2dSame(nn.Conv2d):
    """Pads in its own forward, then convolves without padding (timm's Conv2dSame in kind)."""

    def forward(self, x):
        return F.conv2d(F.pad(x, (1, 1, 1, 1)), self.weight, self.bias, self.stride, 0)


class CausalConv1d(nn.Conv1d):
    """Left-pads by kernel − 1 (causal sequence models)."""

    def forward(self, x):
        return super().forward(F.pad(x, (self.kernel_size[0] - 1, 0)))


class StdConv2d(nn.Conv2d):
    """Weight standardisation computed in forward, with its own asymmetric 'same' padding."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(F.pad(x, (2, 0, 2, 0)), w, self.bias, self.stride, 0)


def test_padding_inside_a_subclass_forward_is_measured():
    x = smooth()
    g = gs.SpatialGradientScaling(nn.Sequential(Conv2dSame(3, 8, 3))).refresh([x]).scalings["0"]
    same(g, expected_g(x, (3, 3), padding=1))
    assert (g - expected_g(x, (3, 3), padding=0)).abs().max() > 0.05  # what was measured before


def test_causal_left_padding_is_measured():
    x = smooth(size=(32,))
    sgs = gs.SpatialGradientScaling(nn.Sequential(CausalConv1d(3, 4, 3))).refresh([x])
    same(sgs.scalings["0"], expected_g(x, (3,), padding=[(2, 0)]))


def test_weight_transform_and_asymmetric_padding_in_forward():
    x = smooth()
    g = gs.SpatialGradientScaling(nn.Sequential(StdConv2d(3, 8, 3))).refresh([x]).scalings["0"]
    same(g, expected_g(x, (3, 3), padding=[(2, 0), (2, 0)]))


def test_pad_module_before_a_conv_and_reflect_padding():
    x = smooth()
    model = nn.Sequential(nn.ZeroPad2d((1, 1, 1, 1)), nn.Conv2d(3, 4, 3))
    same(
        gs.SpatialGradientScaling(model).refresh([x]).scalings["1"],
        expected_g(x, (3, 3), padding=1),
    )
    conv = nn.Conv2d(3, 4, 3, padding=2, dilation=2, padding_mode="reflect")
    g = gs.SpatialGradientScaling(nn.Sequential(conv)).refresh([x]).scalings["0"]
    same(g, expected_g(x, (3, 3), padding=2, dilation=2, padding_mode="reflect"))


class FunctionalUse(nn.Module):
    """Uses a conv's weight through F.conv1d; the conv module itself is never called."""

    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(3, 4, 3, padding=1)
        self.mix = nn.Conv1d(4, 4, 3, groups=4)

    def forward(self, x):
        h = torch.relu(self.body(x)).flatten(2)
        return F.conv1d(h, self.mix.weight, self.mix.bias, padding=2, groups=4, dilation=2)


def test_weight_passed_straight_to_a_conv_op_is_measured():
    model, x = FunctionalUse(), smooth()
    sgs = gs.SpatialGradientScaling(model).refresh([x])
    with torch.no_grad():
        h = torch.relu(model.body(x)).flatten(2)
    same(sgs.scalings["mix"], expected_g(h, (3,), padding=2, dilation=2))
    assert sgs.unmeasured == {}


def test_parametrized_weight_and_a_module_called_twice():
    conv = nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 3, 3, padding=1))
    x1, x2 = smooth(seed=1), smooth(seed=2)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv

        def forward(self, x):
            return self.conv(self.conv(x))

    model = Twice()
    sgs = gs.SpatialGradientScaling(model).refresh([x1, x2])
    with torch.no_grad():
        inner = [conv(x1), conv(x2)]
    same(sgs.scalings["conv"], expected_g([x1, inner[0], x2, inner[1]], (3, 3), padding=1))


# ---- layers the refresh cannot measure ------------------------------------------------------
class TrainOnlyBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(3, 4, 3, padding=1)
        self.aux = nn.Conv2d(4, 4, 5)

    def forward(self, x):
        h = torch.relu(self.body(x))
        out = h.mean((1, 2, 3))
        if self.training:
            out = out + self.aux(h).mean((1, 2, 3))
        return out


def test_an_unreached_layer_keeps_its_scaling_and_is_named():
    model = TrainOnlyBranch()
    sgs = gs.SpatialGradientScaling(model)
    pinned_like = torch.rand(5, 5) + 0.5
    sgs._store("aux", pinned_like)  # as if measured by an earlier refresh
    with pytest.warns(
        RuntimeWarning, match=r"measured 1 of 2 layers.*'aux': no convolution.*exclude="
    ):
        sgs.refresh([smooth()])
    assert set(sgs.unmeasured) == {"aux"}
    same(sgs.scalings["aux"], pinned_like.float())
    assert not torch.equal(sgs.scalings["body"], torch.ones(3, 3))
    # excluded at attach time: the refresh is silent
    sgs.remove()
    quiet = gs.SpatialGradientScaling(model, exclude=["aux"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet.refresh([smooth()])


def test_a_weight_convolved_with_two_geometries_is_not_pooled():
    class TwoWays(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            return self.conv(x) + F.conv2d(x, self.conv.weight, padding=2, dilation=2)

    sgs = gs.SpatialGradientScaling(TwoWays())
    with pytest.warns(RuntimeWarning, match="different padding or dilation"):
        sgs.refresh([smooth()])
    same(sgs.scalings["conv"], torch.ones(3, 3))


# ---- one forward pass when the inputs fit ----------------------------------------------------
class Counting(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 5, padding=2), nn.ReLU()
        )
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.net(x)


@pytest.mark.parametrize("measure", ["nmi", "autocorrelation"])
def test_cache_and_streaming_give_identical_scalings(measure):
    batches = [smooth(seed=s) for s in range(3)]
    results = {}
    for label, budget in (("cached", None), ("streamed", 0), ("overflow", 10_000)):
        model = Counting()
        sgs = gs.SpatialGradientScaling(model, measure=measure, cache_bytes=budget)
        results[label] = sgs.refresh(batches).scalings
        passes = 2 if measure == "nmi" and label != "cached" else 1
        assert model.calls == passes * len(batches), label
    for label in ("streamed", "overflow"):
        for name, g in results["cached"].items():
            same(results[label][name], g)


def test_an_input_modified_in_place_after_capture_is_read_again():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            y = self.conv(x)
            x.mul_(2.0)  # the captured input changes after the conv used it
            return y

    model = InPlace()
    sgs = gs.SpatialGradientScaling(model)
    batches = [smooth()]
    sgs.refresh(batches)
    assert model.calls == 2  # the cache was stale: the model ran again


def test_default_cache_budget_is_a_fraction_of_available_memory():
    budget = refresh.default_cache_bytes(torch.device("cpu"))
    assert 0 < budget < 2**50


def test_sampled_batches_are_identical_on_every_pass():
    data = torch.utils.data.TensorDataset(torch.randn(50, 3, 4, 4), torch.zeros(50))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    batches = refresh.SampledBatches(loader, 3, seed=5)
    first, second = [b[0] for b in batches], [b[0] for b in batches]
    assert len(first) == 3 and all(torch.equal(a, b) for a, b in zip(first, second))
