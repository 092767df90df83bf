"""SGS with AMP (autocast, GradScaler), gradient accumulation and gradient clipping."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradshape as gs
from gradshape import _kernels
from gradshape.dependence import spatial_dependence

ENGINES = ["torch"] + (["compiled"] if _kernels.available() else [])
MODES = ("gradient", "update")


def net(dtype=torch.float32, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).to(dtype)


def batch(n=16, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    # a 3x3 box blur gives the maps a clear spatial dependence (G far from 1)
    x = F.avg_pool2d(torch.randn(n, 3, 10, 10, generator=g, dtype=dtype), 3, 1, 1)
    return x, torch.randint(0, 3, (n,), generator=g)


def attach(model, mode, refresh_on, *, fused=None):
    """A model's optimizer (SGD, or Adam for update mode) and a refreshed SGS in ``mode``."""
    opt = (
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=fused)
        if mode == "gradient"
        else torch.optim.Adam(model.parameters(), lr=1e-2, fused=fused)
    )
    sgs = gs.SpatialGradientScaling(model, mode=mode, optimizer=opt if mode == "update" else None)
    sgs.refresh([refresh_on])
    return opt, sgs


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_params(a, b, atol):
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=atol, msg=n)


# ---- autocast: refresh on bf16 feature maps --------------------------------------------------
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("measure", ["nmi", "autocorrelation"])
def test_refresh_under_bf16_autocast_histograms_the_bf16_maps_in_float32(engine, measure):
    model = net()
    x, _ = batch()
    captured = {}
    hooks = [
        model[i].register_forward_pre_hook(lambda m, a, i=i: captured.setdefault(i, a[0]))
        for i in (0, 2)
    ]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
    for h in hooks:
        h.remove()
    assert captured[2].dtype == torch.bfloat16
    sgs = gs.SpatialGradientScaling(model, measure=measure, engine=engine)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sgs.refresh([x])
    amp_g = sgs.scalings
    for i in (0, 2):
        # bf16 -> float32 is exact, so the expectation is computed on exactly the same numbers
        s = spatial_dependence(captured[i].float(), (3, 3), padding=1, measure=measure)
        torch.testing.assert_close(
            amp_g[str(i)], gs.dependence_to_scaling(s, 5.0).float(), rtol=0, atol=1e-6
        )
    sgs.remove()
    fp32_g = gs.SpatialGradientScaling(model, measure=measure, engine=engine).refresh([x]).scalings
    # bf16 keeps 8 significant bits: a few values change bin and G (max ~3 here) moves by
    # about 0.005; a histogram taken in bf16 arithmetic would not even run on the compiled engine
    for n in fp32_g:
        torch.testing.assert_close(amp_g[n], fp32_g[n], rtol=0, atol=0.02)
        assert (fp32_g[n] - 1).abs().max() > 0.1


# ---- GradScaler ------------------------------------------------------------------------------
def _amp_steps(mode, *, scaler, steps=(0, 1, 2), bad=None, sgs_on=True, fused=None):
    """bf16-autocast steps on micro-batches ``steps`` of one batch; step ``bad`` gets an inf.

    Returns the model and, per step, (weights, optimizer state, G) before and after it.
    """
    model = net()
    x, y = batch()
    opt, sgs = attach(model, mode, x, fused=fused)
    if not sgs_on:
        sgs.remove()
    seen = []
    for i in steps:
        xi, yi = x[4 * i : 4 * i + 4].clone(), y[4 * i : 4 * i + 4]
        if i == bad:
            xi[0, 0, 0, 0] = float("inf")
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(xi), yi)
        before = (params(model), copy.deepcopy(opt.state_dict()), sgs.scalings)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        seen.append((before, (params(model), copy.deepcopy(opt.state_dict()), sgs.scalings)))
    return params(model), seen


def _scaler():
    return torch.amp.GradScaler("cpu", init_scale=2.0**12)


@pytest.mark.parametrize("mode", MODES)
def test_grad_scaler_commutes_with_sgs(mode):
    # A power-of-two loss scale multiplies every gradient exactly, and G·(s·g) = s·(G·g), so
    # unscaling recovers the unscaled run bit for bit.
    scaled, _ = _amp_steps(mode, scaler=_scaler())
    plain, _ = _amp_steps(mode, scaler=None)
    assert_params(scaled, plain, atol=0)
    without_sgs, _ = _amp_steps(mode, scaler=_scaler(), sgs_on=False)
    assert not torch.allclose(scaled["0.weight"], without_sgs["0.weight"])


def _assert_state_equal(a, b):
    assert a["state"].keys() == b["state"].keys()
    for pid, state in a["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(b["state"][pid][key]), torch.as_tensor(value))


@pytest.mark.parametrize("fused", [None, True])  # fused: the optimizer unscales and skips itself
@pytest.mark.parametrize("mode", MODES)
def test_a_step_skipped_by_grad_scaler_changes_nothing(mode, fused):
    scaler = _scaler()
    final, seen = _amp_steps(mode, scaler=scaler, bad=1, fused=fused)
    (w0, opt0, g0), (w1, opt1, g1) = seen[1]
    assert scaler.get_scale() == 2.0**11  # halved once: exactly one step was found non-finite
    assert_params(w1, w0, atol=0)
    assert_params(g1, g0, atol=0)
    _assert_state_equal(opt0, opt1)
    # and the run goes on as if the bad step had never been taken (both scales powers of two)
    clean, _ = _amp_steps(mode, scaler=_scaler(), steps=(0, 2), fused=fused)
    assert_params(final, clean, atol=0)


# ---- gradient accumulation -------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_four_micro_batches_equal_one_big_batch(mode):
    x, y = batch(dtype=torch.float64)
    runs = []
    for micro in (1, 4):
        model = net(torch.float64)
        opt, _ = attach(model, mode, x)
        for _ in range(2):  # two optimizer steps, so momentum / Adam moments take part
            opt.zero_grad()
            for xs, ys in zip(x.chunk(micro), y.chunk(micro)):
                (F.cross_entropy(model(xs), ys) / micro).backward()
            opt.step()
        runs.append(params(model))
    assert_params(runs[1], runs[0], atol=1e-12)


def test_accumulated_gradient_is_g_times_the_big_batch_gradient():
    x, y = batch(dtype=torch.float64)
    model = net(torch.float64)
    reference = copy.deepcopy(model)
    sgs = gs.SpatialGradientScaling(model).refresh([x])
    for xs, ys in zip(x.chunk(4), y.chunk(4)):
        (F.cross_entropy(model(xs), ys) / 4).backward()
    F.cross_entropy(reference(x), y).backward()
    for name, g in sgs.scalings.items():
        expected = reference.get_submodule(name).weight.grad * g.double()
        torch.testing.assert_close(
            model.get_submodule(name).weight.grad, expected, atol=1e-14, rtol=0
        )


# ---- gradient clipping -----------------------------------------------------------------------
def test_clip_grad_norm_sees_the_scaled_gradient():
    x, y = batch(dtype=torch.float64)
    model = net(torch.float64)
    reference = copy.deepcopy(model)
    sgs = gs.SpatialGradientScaling(model).refresh([x])
    F.cross_entropy(model(x), y).backward()
    F.cross_entropy(reference(x), y).backward()
    scaled = []
    for name, p in reference.named_parameters():
        module = name.rsplit(".", 1)[0]
        is_conv_weight = name.endswith("weight") and module in sgs.scalings
        scaled.append(p.grad * sgs.scalings[module].double() if is_conv_weight else p.grad)
    expected = torch.sqrt(sum((g**2).sum() for g in scaled))
    max_norm = 0.25 * float(expected)
    total = nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    torch.testing.assert_close(total, expected, rtol=1e-12, atol=0)
    coef = max_norm / (expected + 1e-6)  # clip_grad_norm_'s own epsilon
    for p, g in zip(model.parameters(), scaled):
        torch.testing.assert_close(p.grad, g * coef, rtol=1e-12, atol=0)


class _ACB(nn.Module):
    """3x3 + 1x3 + 3x1 bias-free convs summed: Lemma 1 with G = [[1,2,1],[2,3,2],[1,2,1]]."""

    def __init__(self, merged: torch.Tensor):
        super().__init__()
        cout, cin = merged.shape[:2]
        kw = dict(bias=False, dtype=merged.dtype)
        self.square = nn.Conv2d(cin, cout, 3, padding=1, **kw)
        self.hor = nn.Conv2d(cin, cout, (1, 3), padding=(0, 1), **kw)
        self.ver = nn.Conv2d(cin, cout, (3, 1), padding=(1, 0), **kw)
        with torch.no_grad():
            self.hor.weight.copy_(0.5 * merged[:, :, 1:2, :])
            self.ver.weight.copy_(0.25 * merged[:, :, :, 1:2])
            self.square.weight.copy_(merged - self.side())

    def side(self):
        return F.pad(self.hor.weight, (0, 0, 1, 1)) + F.pad(self.ver.weight, (1, 1, 0, 0))

    def merged(self):
        return self.square.weight + self.side()

    def forward(self, x):
        return self.square(x) + self.hor(x) + self.ver(x)


def test_clipping_changes_only_the_step_length_relative_to_the_branched_model():
    """The branched model clips by sqrt(Σ G g²); SGS's clip_grad_norm_ clips by ‖G⊙g‖.

    Both move the merged kernel along G⊙g: rescaling SGS's clipped step by the ratio of the two
    norms reproduces the branched model's clipped step exactly.
    """
    torch.manual_seed(3)
    conv = nn.Conv2d(2, 3, 3, padding=1, bias=False).double()
    branched = _ACB(conv.weight.detach().clone())
    x = torch.randn(4, 2, 7, 7, dtype=torch.float64)
    target = torch.randn(4, 3, 7, 7, dtype=torch.float64)
    G = gs.branch_scaling("acb").double()
    sgs = gs.SpatialGradientScaling(conv)
    sgs.set_scaling("", G)
    lr, max_norm = 0.5, 1e-3

    F.mse_loss(branched(x), target).backward()
    branched_norm = nn.utils.clip_grad_norm_(branched.parameters(), max_norm)
    with torch.no_grad():
        for p in branched.parameters():
            p -= lr * p.grad
    F.mse_loss(conv(x), target).backward()
    g = conv.weight.grad / G  # the unscaled gradient
    torch.testing.assert_close(branched_norm, torch.sqrt((G * g**2).sum()), rtol=1e-12, atol=0)
    sgs_norm = nn.utils.clip_grad_norm_(conv.parameters(), max_norm)
    torch.testing.assert_close(sgs_norm, torch.linalg.vector_norm(G * g), rtol=1e-12, atol=0)
    assert sgs_norm > branched_norm > max_norm  # both clip, by different factors
    with torch.no_grad():  # clip_grad_norm_ divides by (norm + 1e-6)
        conv.weight -= lr * conv.weight.grad * (sgs_norm + 1e-6) / (branched_norm + 1e-6)
    torch.testing.assert_close(conv.weight, branched.merged(), rtol=0, atol=1e-14)
