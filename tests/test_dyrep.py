"""DyRep: function-preserving growth, saliency, pruning, optimizer bookkeeping, resume, DDP."""

from __future__ import annotations

import copy
import datetime
import io
import math
import socket
import statistics
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from gradshape import reparam
from gradshape.reparam import (
    DyRep,
    DyRepBlock,
    branches_to_cut,
    fuse_dyrep,
    growable_branches,
    recalibrate_batchnorm,
)
from gradshape.reparam.fusion import fold_batchnorm


def _net(dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 5, stride=2, padding=2), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3),
    ).to(dtype)  # fmt: skip


def _randomise_batchnorms(
    module: nn.Module, seed: int, skip: tuple[nn.Module, ...] = (), *, affine: bool = True
) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d) and m not in skip:
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g))
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
                if affine:
                    m.weight.copy_(torch.randn(c, generator=g))
                    m.bias.copy_(torch.randn(c, generator=g))


def _eval(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    with torch.no_grad():
        y = model(x)
    for m, training in flags:
        m.training = training
    return y


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _set_grads(model: nn.Module, factors: dict[str, float]) -> dict[str, float]:
    """``grad = c·w`` for the named convs (zero elsewhere): Σ g·w = c·‖w‖², returned."""
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    expected = {}
    for name, c in factors.items():
        w = model.get_submodule(name).weight
        w.grad = c * w.detach().clone()
        expected[name] = c * float((w.detach() ** 2).sum())
    return expected


def _batches(n: int = 3, seed: int = 5, dtype: torch.dtype = torch.float64) -> list:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, 8, 8, generator=g, dtype=dtype) for _ in range(n)]


# ---- growth ----------------------------------------------------------------------------------
GEOMETRIES = [  # (c_in, c_out, K, stride, padding, groups)
    (4, 4, 3, 1, 1, 1),
    (4, 4, 5, 1, 2, 1),
    (4, 6, 7, 1, 3, 1),
    (4, 6, 3, 2, 1, 1),
    (4, 4, 3, 1, 1, 2),
    (4, 4, 3, 1, 1, 4),
    (4, 8, 3, 1, 0, 1),
    (4, 4, 5, 1, 1, 2),
]


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-6), (torch.float64, 1e-10)])
def test_growth_keeps_the_eval_output(geometry, dtype, tol):
    c_in, c_out, k, stride, padding, groups = geometry
    torch.manual_seed(1)
    conv = nn.Conv2d(c_in, c_out, k, stride, padding, groups=groups).to(dtype)
    block = DyRepBlock.grown_from(conv, generator=torch.Generator().manual_seed(2))
    expected = ["dense", "pointwise", "seq", "avg", "hor", "ver"]
    if padding != k // 2:
        expected = ["dense", "seq", "avg"]
    elif c_in == c_out and stride == 1:
        expected.append("identity")
    assert (
        block.branches
        == tuple(expected)
        == growable_branches(c_in, c_out, (k, k), (stride, stride), (padding, padding))
    )
    x = torch.randn(2, c_in, 11, 11, dtype=dtype)
    assert _relative(_eval(block, x), _eval(conv, x)) <= tol
    # as after a recalibration: other statistics in the new branches, then the K×K re-solved
    _randomise_batchnorms(block, seed=3, skip=(block.dense.bn,), affine=False)
    block.set_equivalent(conv.weight.detach(), conv.bias.detach())
    assert _relative(_eval(block, x), _eval(conv, x)) <= tol
    assert _relative(_eval(block.fused(), x), _eval(conv, x)) <= tol


def test_a_block_without_dense_bias_keeps_the_bias_in_its_batchnorm():
    torch.manual_seed(3)
    conv = nn.Conv2d(4, 4, 3, padding=1).double()
    block = DyRepBlock(4, 4, 3, bias=False).double()
    _randomise_batchnorms(block, seed=5)
    block.set_equivalent(conv.weight.detach(), conv.bias.detach())
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    assert block.dense.conv.bias is None
    assert _relative(_eval(block, x), _eval(conv, x)) <= 1e-10


def test_from_conv_preserves_conv_and_batchnorm_in_train_and_eval_mode():
    torch.manual_seed(4)
    conv, bn = nn.Conv2d(4, 4, 3, padding=1).double(), nn.BatchNorm2d(4).double()
    reference = nn.Sequential(conv, bn)
    _randomise_batchnorms(reference, seed=6)
    block = DyRepBlock.from_conv(copy.deepcopy(conv), copy.deepcopy(bn))
    assert "identity" in block.branches
    x = torch.randn(3, 4, 7, 7, dtype=torch.float64)
    assert _relative(_eval(block, x), _eval(reference, x)) <= 1e-12
    with torch.no_grad():
        assert _relative(block.train()(x), reference.train()(x)) <= 1e-12


def test_new_branches_start_as_dyrep_initialises_them():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, 3, padding=1, bias=False)
    block = DyRepBlock.grown_from(conv, generator=torch.Generator().manual_seed(0))
    dense = block.dense.bn
    assert torch.equal(dense.weight, torch.ones(16)) and torch.equal(dense.bias, torch.zeros(16))
    assert torch.equal(dense.running_mean, torch.zeros(16))
    assert torch.equal(dense.running_var, torch.ones(16))
    for name in block.branches[1:]:
        norms = [m for m in getattr(block, name).modules() if isinstance(m, nn.BatchNorm2d)]
        assert torch.allclose(norms[-1].weight, torch.full((16,), 0.01))
        for bn in norms[:-1]:
            assert torch.equal(bn.weight, torch.ones(16))
        for bn in norms:
            assert torch.equal(bn.bias, torch.zeros(16))
    # N(0, 2/(kh·kw·c_out)): 2,304 draws estimate the standard deviation to a few percent
    w = block.seq.spatial.weight.detach()
    assert abs(float(w.std()) / math.sqrt(2 / (9 * 16)) - 1) < 0.1
    assert abs(float(w.mean())) < 0.1 * math.sqrt(2 / (9 * 16))


def test_growth_does_not_touch_the_global_rng():
    conv = nn.Conv2d(4, 4, 3, padding=1)
    torch.manual_seed(7)
    DyRepBlock.grown_from(conv, generator=torch.Generator().manual_seed(0))
    after = torch.rand(3)
    torch.manual_seed(7)
    assert torch.equal(after, torch.rand(3))


def test_nested_blocks_keep_and_fuse_the_function():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, padding=1).double()
    block = DyRepBlock.grown_from(conv)
    block.dense.conv = DyRepBlock.grown_from(block.dense.conv)
    block.seq.spatial = DyRepBlock.grown_from(block.seq.spatial)  # padding 0: three branches
    assert block.seq.spatial.branches == ("dense", "seq", "avg")
    _randomise_batchnorms(block, seed=4, skip=(block.dense.bn, block.dense.conv.dense.bn))
    block.set_equivalent(conv.weight.detach(), conv.bias.detach())
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    assert _relative(_eval(block, x), _eval(conv, x)) <= 1e-10
    fused = fuse_dyrep(nn.Sequential(block))
    assert not any(isinstance(m, DyRepBlock) for m in fused.modules())
    assert _relative(_eval(fused, x), _eval(conv, x)) <= 1e-10
    generic = reparam.fuse(nn.Sequential(block))  # the outer block folds the inner ones
    assert not any(isinstance(m, DyRepBlock) for m in generic.modules())
    assert _relative(_eval(generic, x), _eval(conv, x)) <= 1e-10


def test_fuse_equals_the_unfused_net_and_has_the_plain_parameter_count():
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    dyrep = DyRep(net, opt)
    for factors in ({"0": 1.0, "3": 5.0, "6": 2.0}, {"0": 9.0, "6": 2.0}):
        _set_grads(net, _scaled(net, factors))
        dyrep.record()
        dyrep.adjust(_batches())
    net.get_submodule("3").dense.conv = DyRepBlock.grown_from(net.get_submodule("3").dense.conv)
    _randomise_batchnorms(net, seed=8)
    x = _batches(1, seed=9)[0]
    for fold in (False, True):
        deployed = fuse_dyrep(net, fold_batchnorm=fold)
        assert not any(isinstance(m, DyRepBlock) for m in deployed.modules())
        assert _relative(_eval(deployed, x), _eval(net, x)) <= 1e-10
    plain = fuse_dyrep(_net(), fold_batchnorm=True)
    count = sum(p.numel() for p in fuse_dyrep(net, fold_batchnorm=True).parameters())
    assert count == sum(p.numel() for p in plain.parameters())


# ---- saliency --------------------------------------------------------------------------------
def test_the_most_salient_conv_grows_and_a_negative_one_ranks_last():
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    dyrep = DyRep(net, opt)
    assert list(dyrep.candidates) == ["0", "3", "6"]
    # "6" has the largest |Σ g·w| but a negative sign
    expected = _set_grads(net, {"0": 1.0, "3": 2.0, "6": -50.0})
    dyrep.record()
    assert dyrep.scores() == pytest.approx(expected, rel=1e-12)
    assert expected["6"] < expected["0"] < expected["3"]
    x = _batches(1)[0]
    before = _eval(net, x)
    report = dyrep.adjust(_batches())
    assert report.grown == "3" and report.changed and report.score == pytest.approx(expected["3"])
    assert isinstance(net.get_submodule("3"), DyRepBlock)
    assert _relative(_eval(net, x), before) <= 1e-10
    assert dyrep.scores() == {}
    # the grown block's K×K conv is a candidate now (one level of nesting), its 1×1s are not
    assert "3.dense.conv" in dyrep.candidates and "3.seq.spatial" in dyrep.candidates
    assert "3.pointwise.conv" not in dyrep.candidates


def test_scores_average_over_steps_and_are_read_before_the_step():
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    dyrep = DyRep(net, opt, metric="snip")
    sums = {"0": 0.0, "3": 0.0, "6": 0.0}
    for factors in ({"0": 1.0, "3": -2.0, "6": 3.0}, {"0": 4.0, "3": 1.0, "6": -1.0}):
        expected = _set_grads(net, factors)
        for n in sums:
            sums[n] += abs(expected[n])  # SNIP: Σ|g·w| = |c|·‖w‖² here
        dyrep.record()
        opt.step()  # moves the weights: the record must have used the pre-step ones
    assert dyrep.scores() == pytest.approx({n: v / 2 for n, v in sums.items()}, rel=1e-12)
    _set_grads(net, {})
    net.get_submodule("0").weight.grad = None  # no gradient: not counted this step
    dyrep.record()
    assert dyrep.scores()["0"] == pytest.approx(sums["0"] / 2, rel=1e-12)
    assert dyrep.scores()["3"] == pytest.approx(sums["3"] / 3, rel=1e-12)


def test_record_unscales_amp_gradients_and_skips_overflow_steps():
    net = _net(torch.float32)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x, y = _batches(1, dtype=torch.float32)[0], torch.tensor([0, 1, 2, 0])
    F.cross_entropy(net(x), y).backward()
    weights = {n: net.get_submodule(n).weight for n in ("0", "3", "6")}
    plain = {n: float((w.grad * w.detach()).sum()) for n, w in weights.items()}
    opt.zero_grad()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    dyrep = DyRep(net, opt)
    scaler.scale(F.cross_entropy(net(x), y)).backward()
    dyrep.record(scaler)
    scaler.step(opt)  # no second unscale: the scaler knows the gradients are unscaled
    scaler.update()
    assert dyrep.scores() == pytest.approx(plain, rel=1e-6)
    opt.zero_grad()
    scaler.scale(F.cross_entropy(net(x), y)).backward()
    net.get_submodule("3").weight.grad[0, 0, 0, 0] = float("inf")
    dyrep.record(scaler)
    assert dyrep.scores()["3"] == pytest.approx(plain["3"], rel=1e-6)  # the inf step: not counted


# ---- pruning ---------------------------------------------------------------------------------
def test_pruning_rule():
    ratios = {"pointwise": 0.01, "seq": 0.5, "avg": 0.05, "hor": 0.3, "ver": 0.4, "identity": 0.2}
    mean = sum(ratios.values()) / 6  # 0.2433: below it and below 0.1 are pointwise and avg
    assert statistics.stdev(ratios.values()) > 0.02 and mean > 0.05
    assert branches_to_cut(ratios) == ("pointwise", "avg")
    assert branches_to_cut({"seq": 0.05, "avg": 0.06}) == ()  # std 0.007 <= 0.02
    assert branches_to_cut({"seq": 0.001}) == ()  # a lone branch never qualifies
    assert branches_to_cut({"seq": 0.01, "avg": 0.5}, threshold=0.005) == ()
    assert branches_to_cut({"seq": 0.01, "avg": float("nan")}) == ()


def _set_gammas(block: DyRepBlock, ratios: dict[str, float]) -> None:
    with torch.no_grad():
        ref = float(block.dense.bn.weight.abs().mean())
        for name, r in ratios.items():
            bn = block.last_norm(name)
            bn.weight.copy_(torch.linspace(0.5, 1.5, bn.num_features, dtype=bn.weight.dtype))
            bn.weight.mul_(r * ref / float(bn.weight.abs().mean()))


def _grown_net() -> tuple[nn.Sequential, torch.optim.Optimizer, DyRep]:
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    dyrep = DyRep(net, opt)
    _set_grads(net, _scaled(net, {"0": 1.0, "3": 2.0, "6": 1.0}))
    dyrep.record()
    opt.step()
    assert dyrep.adjust(_batches()).grown == "3"
    _randomise_batchnorms(net, seed=11)
    return net, opt, dyrep


def test_adjust_cuts_exactly_the_branches_the_rule_names():
    net, _, dyrep = _grown_net()
    block = net.get_submodule("3")
    ratios = {"pointwise": 0.01, "seq": 0.5, "avg": 0.05, "hor": 0.3, "ver": 0.4, "identity": 0.2}
    _set_gammas(block, ratios)
    assert block.branch_ratios() == pytest.approx(ratios, rel=1e-12)
    x = _batches(1, seed=3)[0]
    before = _eval(net, x)
    report = dyrep.adjust()  # no scores recorded: nothing grows
    assert report.grown is None and report.cut == {"3": ("pointwise", "avg")}
    assert block.branches == ("dense", "seq", "hor", "ver", "identity")
    assert not hasattr(block, "pointwise") and not hasattr(block, "avg")
    assert _relative(_eval(net, x), before) <= 1e-10
    # no cut: a spread of at most 0.02, then a lone branch
    _set_gammas(block, {"seq": 0.05, "hor": 0.06, "ver": 0.07, "identity": 0.06})
    assert dyrep.adjust().cut == {}
    dyrep.cut("3", ("hor", "ver", "identity"))
    _set_gammas(block, {"seq": 0.0001})
    assert dyrep.adjust().cut == {}


def test_cut_collapses_a_block_into_a_plain_conv_with_bias():
    net, opt, dyrep = _grown_net()
    x = _batches(1, seed=3)[0]
    before = _eval(net, x)
    report = dyrep.cut("3", net.get_submodule("3").branches[1:])
    conv = net.get_submodule("3")
    assert type(conv) is nn.Conv2d and conv.bias is not None and report.collapsed == ("3",)
    assert _relative(_eval(net, x), before) <= 1e-10
    assert dyrep.structure() == [("3", "conv", ())]
    assert _held(opt) == {id(p) for p in net.parameters()}
    with pytest.raises(ValueError, match="not a DyRepBlock"):
        dyrep.cut("3", ("seq",))


# ---- optimizer -------------------------------------------------------------------------------
def _held(opt: torch.optim.Optimizer) -> set[int]:
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)), "a parameter is in two groups"
    return set(ids)


def test_the_optimizer_holds_exactly_the_model_parameters_after_each_adjustment():
    net = _net()
    decay = [p for p in net.parameters() if p.dim() > 1]
    no_decay = [p for p in net.parameters() if p.dim() <= 1]
    opt = torch.optim.SGD(
        [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=0.1,
        momentum=0.9,
        weight_decay=1e-3,
    )
    dyrep = DyRep(net, opt)
    for step in range(4):
        _set_grads(net, {n: float(i + step) for i, n in enumerate(dyrep.candidates)})
        dyrep.record()
        opt.step()
        if step % 2:
            old = {n: m.weight for n, m in dyrep.candidates.items()}
            grown = dyrep.adjust(_batches()).grown
            assert _held(opt) == {id(p) for p in net.parameters()}
            assert {id(p) for p in opt.state} <= {id(p) for p in net.parameters()}
            groups = [{id(p) for p in g["params"]} for g in opt.param_groups]
            for p in net.parameters():
                assert id(p) in groups[0 if p.dim() > 1 else 1]
            assert old[grown] not in opt.state  # removed: its momentum is dropped
            assert all(p not in opt.state for p in net.get_submodule(grown).parameters())
            # every surviving old parameter kept its momentum buffer
            assert all(p in opt.state for p in net.get_submodule("1").parameters())
    assert [kind for _, kind, _ in dyrep.structure()] == ["block", "block"]


def test_new_parameters_need_group_of_when_vectors_are_spread_over_groups():
    net = _net()
    biases = [net.get_submodule("6").bias]
    rest = [p for p in net.parameters() if p is not biases[0]]
    opt = torch.optim.SGD([{"params": rest}, {"params": biases}], lr=0.1)
    dyrep = DyRep(net, opt)
    _set_grads(net, {"3": 1.0})
    dyrep.record()
    with pytest.raises(ValueError, match="group_of"):
        dyrep.adjust()
    net = _net()
    rest = [p for p in net.parameters() if p is not net.get_submodule("6").bias]
    opt = torch.optim.SGD([{"params": rest}, {"params": [net.get_submodule("6").bias]}], lr=0.1)
    dyrep = DyRep(net, opt, group_of=lambda name, p: 1 if p.dim() <= 1 else 0)
    _set_grads(net, {"3": 1.0})
    dyrep.record()
    dyrep.adjust()
    assert all(p.dim() <= 1 for p in opt.param_groups[1]["params"])


# ---- schedule and state ----------------------------------------------------------------------
def test_schedule_interval_15_max_500():
    dyrep = DyRep(_net(), torch.optim.SGD(_net().parameters(), lr=0.1), interval=15,
                  max_adjust=500)  # fmt: skip
    due = [e for e in range(600) if dyrep.due(e)]
    assert due == list(range(14, 495, 15)) and len(due) == 33


def _run(model, opt, dyrep, epochs: range, data) -> None:
    xs, ys = data
    for epoch in epochs:
        for x, y in zip(xs[epoch], ys[epoch], strict=True):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            dyrep.record()
            opt.step()
        dyrep.maybe_adjust(epoch, _batches(2, seed=epoch))


def test_a_checkpoint_after_an_adjustment_resumes_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(6, 3, 4, 3, 8, 8, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (6, 3, 4), generator=g))  # fmt: skip

    def setup():
        net = _net()
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, nesterov=True,
                              weight_decay=1e-3)  # fmt: skip
        return net, opt, DyRep(net, opt, interval=2, seed=3)

    ref, ref_opt, ref_dyrep = setup()
    _run(ref, ref_opt, ref_dyrep, range(6), data)
    assert len(ref_dyrep.history) == 3 and ref_dyrep.structure()

    net, opt, dyrep = setup()
    _run(net, opt, dyrep, range(3), data)  # adjusted after epoch 1; epoch 2's scores pending
    buffer = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict(), "dyrep": dyrep.state_dict()},
               buffer)  # fmt: skip
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    net2, opt2, dyrep2 = setup()
    dyrep2.load_state_dict(saved["dyrep"])
    net2.load_state_dict(saved["model"], strict=True)
    opt2.load_state_dict(saved["opt"])
    assert dyrep2.scores() == dyrep.scores()
    _run(net2, opt2, dyrep2, range(3, 6), data)
    assert dyrep2.structure() == ref_dyrep.structure()
    a, b = net2.state_dict(), ref.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_load_state_dict_is_strict():
    _, _, dyrep = _grown_net()
    state = dyrep.state_dict()
    other = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1)).double()
    with pytest.raises(ValueError, match="not a plain nn.Conv2d"):
        DyRep(other, torch.optim.SGD(other.parameters(), lr=0.1)).load_state_dict(state)
    dyrep.cut("3", ("seq",))
    with pytest.raises(ValueError, match="already changed the model"):
        dyrep.load_state_dict(state)
    with pytest.raises(ValueError, match="missing keys"):
        dyrep.load_state_dict({"settings": {}})


# ---- recalibration ---------------------------------------------------------------------------
def test_recalibration_changes_only_the_new_blocks_statistics_and_restores_modes():
    net = _net()
    net.train()
    net.get_submodule("1").eval()  # a mixed state, to be restored
    block = DyRepBlock.grown_from(net.get_submodule("3"))
    net[3] = block
    before = {k: v.clone() for k, v in net.state_dict().items()}
    modes = [m.training for m in net.modules()]
    inputs = []
    hook = block.register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
    norms = [m for m in block.modules() if isinstance(m, nn.BatchNorm2d)]
    assert recalibrate_batchnorm(net, norms, _batches(3)) == 3
    hook.remove()
    assert [m.training for m in net.modules()] == modes
    assert all(bn.momentum == 0.1 for bn in norms)
    ours = {f"3.{k}" for k, _ in block.named_buffers()}
    after = net.state_dict()
    for key, value in after.items():
        if key not in ours:
            assert torch.equal(value, before[key]), key
    # the identity branch's BatchNorm sees the block's input: the average of the batch stats
    means = torch.stack([x.mean(dim=(0, 2, 3)) for x in inputs]).mean(0)
    variances = torch.stack([x.transpose(0, 1).flatten(1).var(1) for x in inputs]).mean(0)
    assert torch.allclose(block.identity.running_mean, means, rtol=1e-12, atol=1e-14)
    assert torch.allclose(block.identity.running_var, variances, rtol=1e-12)
    with pytest.raises(ValueError, match="empty"):
        recalibrate_batchnorm(net, norms, [])
    with pytest.raises(TypeError, match="^recalibration batches must be tensors"):
        recalibrate_batchnorm(net, norms, ["x"])


def test_harness_recalibration_batches_continue_one_seeded_stream():
    """dyrep's recalibration batches: a permutation drawn by torch under the seed, the samples'
    augmentation continuing that stream, the same on every pass, the global RNG untouched."""
    from gradshape.batches import SampledBatches

    class Noisy(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 10

        def __getitem__(self, i: int):
            return torch.full((2,), float(i)) + torch.rand(2), i

    loader = torch.utils.data.DataLoader(Noisy(), batch_size=4)
    state = torch.get_rng_state()
    batches = SampledBatches(loader, 2, 7, where="dyrep", setting="dyrep.recal_batches",
                             reseed=False)  # fmt: skip
    passes = [list(batches), list(batches)]
    assert torch.equal(torch.get_rng_state(), state)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        order = torch.randperm(10)[:8].tolist()
        expected = [loader.collate_fn([loader.dataset[i] for i in order[k : k + 4]])
                    for k in (0, 4)]  # fmt: skip
    for got in passes:
        assert len(got) == 2
        for (x, i), (x_ref, i_ref) in zip(got, expected, strict=True):
            assert torch.equal(i, i_ref) and torch.equal(x, x_ref)


def test_bad_settings_raise():
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="metric"):
        DyRep(net, opt, metric="fisher")
    with pytest.raises(ValueError, match="interval"):
        DyRep(net, opt, interval=0)
    with pytest.raises(ValueError, match="branches"):
        DyRepBlock(4, 6, 3, branches=("dense", "identity"))
    with pytest.raises(ValueError, match="even size"):
        DyRepBlock.grown_from(nn.Conv2d(2, 2, 2))


def test_fold_batchnorm_helper_is_the_fusion_rule():
    # fuse_dyrep(fold_batchnorm=True) folds conv → BN as fusion.fold_batchnorm does
    net = _net()
    _randomise_batchnorms(net, seed=2)
    folded = fuse_dyrep(net, fold_batchnorm=True)
    kernel, bias = fold_batchnorm(net[0].weight, None, net[1])
    assert torch.equal(folded[0].weight, kernel) and torch.equal(folded[0].bias, bias)
    assert isinstance(folded[1], nn.Identity)


# ---- torch.distributed -----------------------------------------------------------------------
WORLD = 2
# each rank's SynFlow factors: rank 0 alone would grow "0", rank 1 alone "3"; the mean grows "6"
FACTORS = ({"0": 3.0, "3": 0.0, "6": 2.0}, {"0": 0.0, "3": 3.0, "6": 2.0})


def _scaled(model: nn.Module, factors: dict[str, float]) -> dict[str, float]:
    norms = {n: float((model.get_submodule(n).weight.detach() ** 2).sum()) for n in factors}
    return {n: c / norms[n] for n, c in factors.items()}  # Σ g·w = the factor itself


def _ddp_worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=60))  # fmt: skip
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    dyrep = DyRep(net, opt, seed=4)
    _set_grads(net, _scaled(net, FACTORS[rank]))
    dyrep.record()
    report = dyrep.adjust(_batches(2, seed=10 + rank))
    adjusted = {k: v.clone() for k, v in net.state_dict().items()}
    ddp = nn.parallel.DistributedDataParallel(net)  # re-wrapped after the change
    x, y = _batches(1, seed=20 + rank)[0], torch.tensor([0, 1, 2, 1])
    opt.zero_grad()
    F.cross_entropy(ddp(x), y).backward()
    opt.step()
    torch.save({"grown": report.grown, "scores": report.scores, "adjusted": adjusted,
                "params": dict(net.named_parameters())}, Path(out) / f"rank{rank}.pt")  # fmt: skip
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ranks_grow_the_same_conv_from_all_reduced_scores(tmp_path):
    ctx = mp.start_processes(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD,
                             join=False, start_method="spawn")  # fmt: skip
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the two ranks did not finish within 120 s (deadlock?)")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    assert ranks[0]["grown"] == ranks[1]["grown"] == "6"
    assert ranks[0]["scores"] == pytest.approx({"0": 1.5, "3": 1.5, "6": 2.0}, rel=1e-12)
    for key in ("adjusted", "params"):
        a, b = ranks[0][key], ranks[1][key]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), key
    # the recalibrated statistics are the mean of the two ranks' (equal batch counts): the
    # single-process recalibration on the union of the batches
    net = _net()
    dyrep = DyRep(net, torch.optim.SGD(net.parameters(), lr=0.1), seed=4)
    _set_grads(net, {"6": 1.0})
    dyrep.record()
    dyrep.adjust(_batches(2, seed=10) + _batches(2, seed=11))
    union = net.get_submodule("6").seq.pad.bn.running_mean
    got = ranks[0]["adjusted"]["6.seq.pad.bn.running_mean"]
    assert torch.allclose(got, union, rtol=1e-12, atol=1e-14)


# ---- the harness -----------------------------------------------------------------------------
def _harness_cfg(method: str, epochs: int):
    from gradshape.harness.config import DataConfig, ModelConfig, OptimConfig, RunConfig

    return RunConfig(
        method=method,
        device="cpu",
        data=DataConfig("digits", subset=320),
        model=ModelConfig("tiny"),
        optim=OptimConfig(batch_size=32, lr=0.05, warmup_epochs=0.5, epochs=epochs),
    )


def test_harness_dyrep_resumes_bit_for_bit_after_an_adjustment(tmp_path, monkeypatch):
    from gradshape.harness.models import create_model
    from test_train import straight_and_resumed

    cfg = _harness_cfg("dyrep@interval=2@max_adjust=4@recal_batches=2", 4)
    # killed after epoch 2: one adjustment done, epoch 2's scores held
    straight, resumed = straight_and_resumed(cfg, tmp_path, 3, monkeypatch)
    assert straight["dyrep"] == resumed["dyrep"]
    assert [r["epoch"] for r in straight["dyrep"]["adjustments"]] == [1, 3]
    assert straight["test_acc"] == resumed["test_acc"]
    assert straight["fusion_ok"] and straight["params"] > straight["params_deployed"]
    plain = fuse_dyrep(create_model("tiny", num_classes=10, in_channels=1), fold_batchnorm=True)
    assert straight["params_deployed"] == sum(p.numel() for p in plain.parameters())


def test_harness_dyrep_settings_and_composition():
    from gradshape.harness.methods import parse_method, resolve_method

    _, cfg = resolve_method(_harness_cfg("dyrep@interval=5@metric=snip", 1))
    assert (cfg.dyrep.interval, cfg.dyrep.metric) == (5, "snip")
    with pytest.raises(ValueError, match="dyrep.*cdg.*do not compose"):
        parse_method("dyrep+cdg")
    parse_method("dyrep+pgt")  # a loss transform holds no parameter hooks
