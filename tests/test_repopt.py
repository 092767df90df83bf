"""RepOptimizers: CSLA under SGD/AdamW equals a plain conv with the derived multipliers."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradshape as gs
from gradshape.reparam import (
    CSLABlock,
    DecoupledStepScaling,
    attach_repopt,
    convert_csla,
    csla_scales,
    load_csla_scales,
    repopt_reinit,
    repopt_scalings,
)
from gradshape.reparam.fusion import identity_kernel


def _pair(c_in: int, c_out: int, stride: int, scales: dict[str, torch.Tensor], seed: int = 0):
    """A CSLA net (block → BN → ReLU → pool → linear) with constant s, t (trainable u) and the
    plain net with the same initial merged kernel and the same other layers, in float64."""
    torch.manual_seed(seed)
    block = CSLABlock(c_in, c_out, 3, stride, trainable_scales=False).double()
    with torch.no_grad():
        for key, value in scales.items():
            getattr(block, key).copy_(value)
    tail = [nn.BatchNorm2d(c_out), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(c_out, 3)]  # fmt: skip
    hs = nn.Sequential(block, *tail).double()
    plain = nn.Sequential(block.fused(), *copy.deepcopy(tail)).double()
    return hs, plain


def _data(c_in: int, steps: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(steps, 8, c_in, 7, 7, generator=g, dtype=torch.float64)
    return xs, torch.randint(0, 3, (steps, 8), generator=g)


def _train(net: nn.Module, opt: torch.optim.Optimizer, data) -> None:
    for x, y in zip(*data, strict=True):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _scales(c: int, *, negative: bool, seed: int = 2, identity: bool = True) -> dict:
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    t = torch.rand(c, generator=g, dtype=torch.float64) + 0.3
    if negative:
        s[0] = -s[0]
        t[1] = -t[1]
    out = {"s": s, "t": t}
    if identity:
        out["u"] = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    return out


# ---- SGD: the Lemma-1 analogue ---------------------------------------------------------------
@pytest.mark.parametrize(("c_in", "c_out", "stride"), [(4, 4, 1), (4, 6, 2)])
def test_sgd_on_csla_equals_plain_sgd_with_the_derived_multipliers(c_in, c_out, stride):
    hs, plain = _pair(c_in, c_out, stride, _scales(c_out, negative=True, identity=c_in == c_out))
    assert hs[0].has_identity == (c_in == c_out)
    settings = {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4}
    opt_hs = torch.optim.SGD(hs.parameters(), **settings)
    opt_plain = torch.optim.SGD(plain.parameters(), **settings)
    attach_repopt(plain, repopt_scalings(hs, opt_hs), opt_plain)
    data = _data(c_in, 50)
    _train(hs, opt_hs, data)
    _train(plain, opt_plain, data)
    moved = _relative(plain[0].weight.detach(), hs[0].fused().weight.detach())
    assert moved <= 1e-10
    for a, b in zip(hs[1:].parameters(), plain[1:].parameters(), strict=True):
        assert _relative(b.detach(), a.detach()) <= 1e-10
    # and the multipliers matter: plain SGD drifts away from the structure
    _, unscaled = _pair(c_in, c_out, stride, _scales(c_out, negative=True, identity=c_in == c_out))
    _train(unscaled, torch.optim.SGD(unscaled.parameters(), **settings), data)
    assert _relative(unscaled[0].weight.detach(), hs[0].fused().weight.detach()) > 1e-3


def test_unit_scales_give_repvggs_lemma_1_scaling_plus_the_identity():
    block = CSLABlock(3, 5, 3, 2)  # no identity term
    g = repopt_scalings(nn.Sequential(block))["0"]
    assert g.shape == (5, 3, 3, 3)
    assert torch.equal(g, gs.branch_scaling("repvgg", 3).double().expand(5, 3, 3, 3))
    block = CSLABlock(4, 4, 3, 1, groups=2)  # identity: +1 on the (o = i) diagonal centre
    g = repopt_scalings(nn.Sequential(block))["0"]
    expected = gs.branch_scaling("repvgg", 3).double() + identity_kernel(4, 2, (3, 3)).double()
    assert torch.equal(g, expected)


def test_channel_wise_multipliers_equal_hand_multiplied_gradients():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    conv(x).square().sum().backward()
    raw = conv.weight.grad.clone()
    per_output = torch.rand(4, 3, 3, dtype=torch.float64) + 0.5
    per_weight = torch.rand(4, 3, 3, 3, dtype=torch.float64) + 0.5
    for g, broadcast in ((per_output, per_output[:, None]), (per_weight, per_weight)):
        conv.weight.grad = None
        sgs = gs.SpatialGradientScaling(nn.Sequential(conv))
        sgs.set_scaling("0", g)
        conv(x).square().sum().backward()
        assert torch.allclose(conv.weight.grad, raw * broadcast, rtol=1e-14, atol=0)
        sgs.remove()
    # a channel-constant G is the kernel-shaped G
    kernel = torch.rand(3, 3, dtype=torch.float64) + 0.5
    grads = []
    for g in (kernel, kernel.expand(4, 3, 3), kernel.expand(4, 3, 3, 3)):
        conv.weight.grad = None
        sgs = gs.SpatialGradientScaling(nn.Sequential(conv))
        sgs.set_scaling("0", g)
        conv(x).square().sum().backward()
        grads.append(conv.weight.grad.clone())
        sgs.remove()
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])
    sgs = gs.SpatialGradientScaling(nn.Sequential(conv))
    with pytest.raises(ValueError, match=r"'0'.*\(3, 3\).*\(4, 3, 3\).*\(4, 3, 3, 3\)"):
        sgs.set_scaling("0", torch.ones(3, 3, 3))


# ---- AdamW -----------------------------------------------------------------------------------
def _adamw(net: nn.Module, eps: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(net.parameters(), lr=1e-2, eps=eps, weight_decay=0.05)


def _adamw_pair(scales: dict, eps: float, multipliers=None, steps: int = 20):
    hs, plain = _pair(4, 4, 1, scales)
    opt_hs, opt_plain = _adamw(hs, eps), _adamw(plain, eps)
    if multipliers is None:
        attach_repopt(plain, repopt_scalings(hs, opt_hs), opt_plain)
    else:
        multipliers(plain, opt_plain)
    data = _data(4, steps)
    _train(hs, opt_hs, data)
    _train(plain, opt_plain, data)
    return hs[0].fused().weight.detach(), plain[0].weight.detach()


def _centre_error(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    centre = torch.zeros(3, 3, dtype=torch.bool)
    centre[1, 1] = True
    diff = (a - b).abs() / b.abs().max()
    return float(diff[..., ~centre].max()), float(diff[..., centre].max())


def test_adamw_without_epsilon_is_exact():
    csla, plain = _adamw_pair(_scales(4, negative=False), eps=0.0)
    assert _relative(plain, csla) <= 1e-10


def _adamw_fed(scales: dict, eps: float, multipliers=None, steps: int = 20):
    """AdamW on the CSLA branches and on the plain conv (with ``M``), both fed the same merged
    gradients ``G`` (the plain net's): the branch gradients are ``s⊙G``, ``t⊙G_c`` and
    ``G_{oo,c}``.  Without the forward feedback, an ``O(ε)`` difference at the centre cannot
    spread to the other entries.  Returns the two merged kernels and the gradients at the
    centre, step by step."""
    hs, plain = _pair(4, 4, 1, scales)
    block, conv = hs[0], plain[0]
    opt_hs = torch.optim.AdamW([block.weight, block.weight_1x1, block.u], lr=1e-2, eps=eps,
                               weight_decay=0.05)  # fmt: skip
    opt_plain = torch.optim.AdamW([conv.weight], lr=1e-2, eps=eps, weight_decay=0.05)
    raw = {}
    conv.weight.register_hook(lambda g: raw.update(g=g.clone()))  # before M is applied
    if multipliers is None:
        attach_repopt(plain, repopt_scalings(hs, opt_hs), opt_plain)
    else:
        multipliers(plain, opt_plain)
    eye, centres = torch.arange(4), []
    for x, y in zip(*_data(4, steps), strict=True):
        opt_plain.zero_grad()
        F.cross_entropy(plain(x), y).backward()
        g = raw["g"]
        centres.append(g[..., 1, 1].clone())
        block.weight.grad = block.s.detach()[:, None, None, None] * g
        block.weight_1x1.grad = block.t.detach()[:, None, None, None] * g[..., 1:2, 1:2]
        block.u.grad = g[eye, eye, 1, 1].clone()
        opt_hs.step()
        opt_plain.step()
    return block.merged_kernel().detach(), conv.weight.detach(), torch.stack(centres)


def test_adamw_epsilon_leaves_an_error_at_the_centre_only():
    csla, plain, _ = _adamw_fed(_scales(4, negative=False), eps=0.0)
    assert _relative(plain, csla) <= 1e-12
    eps, lr = 1e-8, 1e-2
    csla, plain, centres = _adamw_fed(_scales(4, negative=False), eps=eps)
    off, centre = _centre_error(csla, plain)
    assert off <= 1e-12
    # Each branch's Adam divides by √v̂ + ε/c_b, the merged one by √v̂ + ε/M: per step the centre
    # differs by at most lr·(branches − 1)·ε·|m̂|/v̂ ≤ lr·2·ε·3.2/√v̂ (|m̂|/√v̂ ≤ (1 − β1)/√(1 − β2)
    # ≈ 3.2 for Adam's defaults); v̂ of the raw centre gradients, bias-corrected, step by step.
    v = torch.zeros_like(centres[0])
    bound = 0.0
    for step, g in enumerate(centres, start=1):
        v = 0.999 * v + 0.001 * g * g
        bound += lr * 2 * eps * 3.2 / float((v / (1 - 0.999**step)).sqrt().min())
    error = centre * float(plain.abs().max())
    assert 0 < error <= bound and error > 1e3 * off * float(plain.abs().max())


def _upstream_signed(scales: dict):
    """The authors' AdamW form by hand: M = s + t·[centre] + [o = i]·[centre], signed, on the
    gradient and on the adaptive part of the step."""
    centre = torch.zeros(3, 3, dtype=torch.float64)
    centre[1, 1] = 1
    m = scales["s"][:, None, None, None] + scales["t"][:, None, None, None] * centre
    m = m + identity_kernel(4, 1, (3, 3), dtype=torch.float64)

    def attach(plain: nn.Module, opt: torch.optim.Optimizer) -> None:
        weight = plain[0].weight
        weight.register_hook(lambda g: g * m)
        saved = {}
        opt.register_step_pre_hook(lambda *_: saved.update(old=weight.detach().clone()))

        def after(*_):
            with torch.no_grad():
                base = saved["old"] * (1 - 1e-2 * 0.05)
                weight.copy_(base + m * (weight - base))

        opt.register_step_post_hook(after)

    return attach


def test_adamw_with_a_negative_scale_needs_absolute_values():
    scales = _scales(4, negative=True)
    csla, plain = _adamw_pair(scales, eps=0.0)  # full training, forward feedback included
    assert _relative(plain, csla) <= 1e-10
    csla, signed, _ = _adamw_fed(scales, eps=0.0, multipliers=_upstream_signed(scales))
    off, centre = _centre_error(csla, signed)
    assert off <= 1e-12  # off the centre the sign cancels (applied twice) ...
    assert centre > 1e-3  # ... at the centre s + t is not |s| + |t|


def test_update_mode_leaves_decoupled_weight_decay_unscaled():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1).double()
    twin = copy.deepcopy(conv)
    m = torch.rand(3, 2, 3, 3, dtype=torch.float64) + 0.5
    opt = torch.optim.AdamW([conv.weight], lr=0.1, weight_decay=0.3)
    twin_opt = torch.optim.AdamW([twin.weight], lr=0.1, weight_decay=0.0)
    DecoupledStepScaling({"w": conv.weight}, {"w": m}, opt)
    old = conv.weight.detach().clone()
    grad = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    conv.weight.grad, twin.weight.grad = grad.clone(), grad.clone()
    opt.step()
    twin_opt.step()  # the adaptive part alone (AdamW's moments ignore the decoupled decay)
    adaptive = twin.weight.detach() - old
    expected = old * (1 - 0.1 * 0.3) + m * adaptive
    assert torch.allclose(conv.weight.detach(), expected, rtol=1e-14, atol=1e-16)
    # a parameter without a gradient is left alone (AdamW does not decay it either)
    conv.weight.grad = None
    before = conv.weight.detach().clone()
    opt.step()
    assert torch.equal(conv.weight.detach(), before)


def test_only_sgd_and_adamw_are_supported():
    net = nn.Sequential(CSLABlock(2, 2))
    with pytest.raises(ValueError, match="SGD .* and AdamW; got Adam"):
        repopt_scalings(net, torch.optim.Adam(net.parameters()))
    assert repopt_scalings(net, torch.optim.AdamW(net.parameters()))["0"].shape == (2, 2, 3, 3)


def test_a_zero_scale_is_named():
    net = nn.Sequential(CSLABlock(2, 3))
    with torch.no_grad():
        net[0].s[2] = 0.0
    with pytest.raises(ValueError, match=r"'0' has s = 0 in output channel\(s\) \[2\]"):
        repopt_scalings(net)


# ---- initialisation, conversion, scales, state -----------------------------------------------
@pytest.mark.parametrize("identity", ["trained", "one"])
def test_the_reinitialised_target_computes_the_csla_block_at_step_0(identity):
    torch.manual_seed(0)
    target = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1).double())
    w3 = target[0].weight.detach().clone()
    hs = convert_csla(target).model
    scales = _scales(4, negative=True)
    with torch.no_grad():
        for key, value in scales.items():
            getattr(hs[0], key).copy_(value)
    repopt_reinit(target, hs, identity=identity, generator=torch.Generator().manual_seed(5))
    block = CSLABlock(4, 4, 3, bias=True).double()
    with torch.no_grad():
        block.weight.copy_(w3)
        block.bias.copy_(target[0].bias)
        nn.init.kaiming_uniform_(block.weight_1x1, a=5**0.5,
                                 generator=torch.Generator().manual_seed(5))  # fmt: skip
        block.s.copy_(scales["s"])
        block.t.copy_(scales["t"])
        block.u.copy_(scales["u"] if identity == "trained" else torch.ones(4))
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        assert _relative(target(x), block(x)) <= 1e-12


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=0), nn.Conv2d(4, 2, 1),
    )  # fmt: skip


def test_convert_csla_copies_the_conv_and_initialises_scales_by_stage():
    model = _model()
    conversion = convert_csla(model)
    hs = conversion.model
    assert conversion.converted == ("0", "3", "6")
    assert dict(conversion.skipped).keys() == {"9", "10"}
    assert "K // 2" in dict(conversion.skipped)["9"] and "(1, 1)" in dict(conversion.skipped)["10"]
    assert torch.equal(hs[0].weight, model[0].weight) and torch.equal(hs[0].bias, model[0].bias)
    values = [float(hs[i].s[0].detach()) for i in (0, 3, 6)]
    assert values == pytest.approx([1.0, 2**0.5, 1.0])  # stage start, then √(2/1), √(2/2)
    assert [hs[i].has_identity for i in (0, 3, 6)] == [False, True, True]
    x = torch.randn(2, 3, 6, 6)
    for i in (0, 3, 6):
        with torch.no_grad():
            y = hs[:i](x)
            assert torch.allclose(hs[i].fused()(y), hs[i](y), atol=1e-6)


def test_scales_load_strictly_by_module_name():
    hs = convert_csla(_model()).model
    with torch.no_grad():
        hs[3].s.mul_(3.0)
    scales = csla_scales(hs)
    other = convert_csla(_model()).model
    load_csla_scales(other, scales)
    assert all(torch.equal(a, b) for a, b in zip(hs.parameters(), other.parameters(),
                                                 strict=True) if a.dim() == 1)  # fmt: skip
    assert torch.equal(other[3].s, hs[3].s)
    with pytest.raises(
        ValueError, match=r"only in the scales: \['9'\].*only in the model: \['6'\]"
    ):
        load_csla_scales(other, {**{k: v for k, v in scales.items() if k != "6"}, "9": scales["6"]})
    with pytest.raises(ValueError, match="has no identity term"):
        load_csla_scales(other, {**scales, "0": {**scales["0"], "u": torch.ones(4)}})
    with pytest.raises(ValueError, match=r"'3'.s has shape \(5,\)"):
        load_csla_scales(other, {**scales, "3": {**scales["3"], "s": torch.ones(5)}})
    with pytest.raises(ValueError, match="no nn.Conv2d '3'"):
        repopt_reinit(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1)), hs)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_state_round_trips_and_remove_restores_plain_gradients(kind):
    model = _model().double()
    hs = convert_csla(model).model
    with torch.no_grad():
        for name in ("0", "3", "6"):
            hs.get_submodule(name).s.uniform_(0.5, 2.0)
    make = torch.optim.SGD if kind == "sgd" else torch.optim.AdamW
    opt = make(model.parameters(), lr=0.1)
    transform = attach_repopt(model, repopt_scalings(hs, kind), opt)
    state = transform.state_dict()
    other = _model().double()
    twin = attach_repopt(other, {n: torch.ones(g.shape, dtype=torch.float64)
                                 for n, g in repopt_scalings(hs, kind).items()},
                         make(other.parameters(), lr=0.1))  # fmt: skip
    twin.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(
        twin.transforms[0].scalings.values(), transform.transforms[0].scalings.values(),
        strict=True))  # fmt: skip
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    model(x).sum().backward()
    scaled = model[3].weight.grad.clone()
    transform.remove()
    model.zero_grad()
    model(x).sum().backward()
    assert not torch.equal(model[3].weight.grad, scaled)
    reference = _model().double()
    reference(x).sum().backward()
    assert torch.equal(model[3].weight.grad, reference[3].weight.grad)


# ---- the harness -----------------------------------------------------------------------------
def _harness_cfg(method: str, epochs: int, optimizer: str = "sgd"):
    from gradshape.harness.config import DataConfig, ModelConfig, OptimConfig, RunConfig

    return RunConfig(
        method=method,
        device="cpu",
        data=DataConfig("digits", subset=320),
        model=ModelConfig("tiny"),
        optim=OptimConfig(optimizer, batch_size=32, lr=0.05, warmup_epochs=0.5, epochs=epochs),
    )


def test_harness_repopt_runs_the_search_then_the_target(tmp_path):
    from gradshape.harness import train
    from gradshape.harness.checkpoint import load_checkpoint
    from gradshape.harness.models import create_model

    record = train.train_run(_harness_cfg("repopt@search_epochs=1", 2), tmp_path / "r",
                             progress=False)  # fmt: skip
    search = tmp_path / "r" / "search"
    assert record["search"]["epochs"] == 1 and record["search"]["folder"] == "search"
    assert record["config"]["repopt"]["scales"] == str(search / "repopt_scales.pt")
    assert record["params"] == record["params_deployed"]  # a plain model throughout
    # the file beside the search run holds the scales of its final model, by module name
    searched = json.loads((search / "run.json").read_text())
    assert searched["method"] == "repopt-hs" and searched["repopt_scales"] == "repopt_scales.pt"
    assert searched["fusion_ok"] and searched["params"] > searched["params_deployed"]
    hs = convert_csla(create_model("tiny", num_classes=10, in_channels=1)).model
    hs.load_state_dict(load_checkpoint(search / "checkpoint.pt")["model"])
    saved = load_checkpoint(search / "repopt_scales.pt")
    expected = csla_scales(hs)
    assert saved.keys() == expected.keys()
    for name, scales in expected.items():
        for key, value in scales.items():
            assert (value is None and saved[name][key] is None) or torch.equal(
                saved[name][key], value
            )
    mean = {n: g.mean(dim=(0, 1)).tolist() for n, g in repopt_scalings(hs, "sgd").items()}
    assert record["repopt"]["mean_scaling"] == mean
    # a second target run reuses the file (no search), here with AdamW
    again = train.train_run(
        _harness_cfg(f"repopt@scales={search / 'repopt_scales.pt'}", 1, "adamw"),
        tmp_path / "again",
        progress=False,
    )
    assert "search" not in again
    with pytest.raises(ValueError, match="derived for optim.name"):
        train.train_run(_harness_cfg(f"repopt@scales={search / 'repopt_scales.pt'}", 1, "adam"),
                        tmp_path / "adam", progress=False)  # fmt: skip
