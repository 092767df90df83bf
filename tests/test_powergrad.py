"""PowerGrad: the logits' gradient against (softmax(αz) − q)·w by hand, nn.CrossEntropyLoss's
ignore_index and reductions at α = 1, identities, errors."""

from __future__ import annotations

import copy
import doctest

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradshape.powergrad
from gradshape.powergrad import PowerGrad, powergrad_cross_entropy
from gradshape.transform import GradientTransform, compose

F64 = torch.float64


def logits_and_target(n=6, c=5, seed=0, extra=()):
    g = torch.Generator().manual_seed(seed)
    z = (3 * torch.randn(n, c, *extra, generator=g, dtype=F64)).requires_grad_()
    return z, torch.randint(0, c, (n, *extra), generator=g)


def smoothed_onehot(target, c, s):
    """q = (1 − s)·onehot + s/C, built entry by entry (class dim 1)."""
    q = torch.full((target.shape[0], c, *target.shape[1:]), s / c, dtype=F64)
    for idx in torch.cartesian_prod(*[torch.arange(k) for k in target.shape]).view(
        -1, target.dim()
    ):
        i, rest = int(idx[0]), tuple(int(v) for v in idx[1:])
        q[(i, int(target[(i, *rest)]), *rest)] += 1 - s
    return q


def power_softmax(z, alpha):
    """p̃_c = p_c^α / Σ_j p_j^α with p = softmax(z), as the paper writes it."""
    p = torch.softmax(z.detach(), dim=1)
    powered = p**alpha
    return powered / powered.sum(1, keepdim=True)


# ---- the backward ----------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [0.25, 0.6, 1.0])
@pytest.mark.parametrize("s", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_logit_gradient_matches_formula(alpha, s, reduction):
    z, t = logits_and_target()
    loss = powergrad_cross_entropy(z, t, alpha, label_smoothing=s, reduction=reduction)
    weight = torch.linspace(0.5, 2.0, z.shape[0], dtype=F64)
    (loss @ weight if reduction == "none" else loss).backward()
    delta = power_softmax(z, alpha) - smoothed_onehot(t, z.shape[1], s)
    scale = {"mean": 1 / z.shape[0], "sum": 1.0, "none": weight[:, None]}[reduction]
    torch.testing.assert_close(z.grad, delta * scale, rtol=0, atol=1e-15)


def test_sharpening_needs_the_flag_and_follows_the_formula():
    z, t = logits_and_target()
    powergrad_cross_entropy(z, t, 1.7, allow_sharpen=True).backward()
    expected = (power_softmax(z, 1.7) - smoothed_onehot(t, z.shape[1], 0.0)) / z.shape[0]
    torch.testing.assert_close(z.grad, expected, rtol=0, atol=1e-15)


def test_spatial_logits_follow_the_formula():
    z, t = logits_and_target(n=3, c=4, extra=(2, 3))
    grad_out = torch.randn(3, 2, 3, dtype=F64)
    powergrad_cross_entropy(z, t, 0.3, label_smoothing=0.2, reduction="none").backward(grad_out)
    delta = power_softmax(z, 0.3) - smoothed_onehot(t, 4, 0.2)
    torch.testing.assert_close(z.grad, delta * grad_out[:, None], rtol=0, atol=1e-15)
    z.grad = None
    powergrad_cross_entropy(z, t, 0.3, label_smoothing=0.2).backward()
    torch.testing.assert_close(z.grad, delta / (3 * 2 * 3), rtol=0, atol=1e-15)


def test_probability_targets_are_smoothed_like_cross_entropy():
    z, _ = logits_and_target()
    probs = torch.softmax(torch.randn(6, 5, dtype=F64), dim=1)
    loss = powergrad_cross_entropy(z, probs, 0.4, label_smoothing=0.1)
    torch.testing.assert_close(
        loss, F.cross_entropy(z, probs, label_smoothing=0.1), rtol=0, atol=1e-15
    )
    loss.backward()
    q = 0.9 * probs + 0.1 / 5
    torch.testing.assert_close(z.grad, (power_softmax(z, 0.4) - q) / 6, rtol=0, atol=1e-15)


@pytest.mark.parametrize("soft", [False, True])
def test_alpha_one_function_equals_cross_entropy_gradient(soft):
    z, t = logits_and_target()
    if soft:  # unnormalised weights too: CE's gradient is p·Σq − q
        t = torch.rand(6, 5, dtype=F64, generator=torch.Generator().manual_seed(3))
    powergrad_cross_entropy(z, t, 1.0, label_smoothing=0.1).backward()
    ref = z.detach().clone().requires_grad_()
    F.cross_entropy(ref, t, label_smoothing=0.1).backward()
    torch.testing.assert_close(z.grad, ref.grad, rtol=0, atol=1e-15)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("s", [0.0, 0.15])
def test_forward_value_is_cross_entropy(reduction, s):
    z, t = logits_and_target()
    got = powergrad_cross_entropy(z, t, 0.25, label_smoothing=s, reduction=reduction)
    expected = F.cross_entropy(z, t, label_smoothing=s, reduction=reduction)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-14)


def test_grad_output_scaling_and_accumulation_are_exact():
    z, t = logits_and_target(n=8)
    powergrad_cross_entropy(z, t, 0.25).backward()
    base = z.grad.clone()
    # AMP-style power-of-two loss scale: exactly a scaled gradient
    z.grad = None
    (powergrad_cross_entropy(z, t, 0.25) * 1024).backward()
    assert torch.equal(z.grad, base * 1024)
    # any factor
    z.grad = None
    (powergrad_cross_entropy(z, t, 0.25) * 3).backward()
    torch.testing.assert_close(z.grad, base * 3, rtol=1e-15, atol=0)
    # accumulation over two half batches with loss / 2 equals the full-batch mean
    z.grad = None
    for rows in (slice(0, 4), slice(4, 8)):
        (powergrad_cross_entropy(z[rows], t[rows], 0.25) / 2).backward()
    assert torch.equal(z.grad, base)


def test_parameter_gradients_are_the_chain_rule_of_the_logit_gradient():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 4 * 4, 5)).to(F64)
    twin = copy.deepcopy(net)
    x, t = torch.randn(4, 2, 6, 6, dtype=F64), torch.tensor([0, 4, 2, 2])
    PowerGrad(alpha=0.3, label_smoothing=0.1)(net(x), t).backward()
    z = twin(x)
    z.backward((power_softmax(z, 0.3) - smoothed_onehot(t, 5, 0.1)) / 4)
    for p, q in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-14)


# ---- ignore_index and reduction, as nn.CrossEntropyLoss ---------------------------------------
def with_ignored(target, ignore_index, every=3):
    """target with every third prediction (in flat order) set to ignore_index."""
    out = target.clone()
    out.view(-1)[::every] = ignore_index
    return out


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("s", [0.0, 0.1])
@pytest.mark.parametrize(("ignore_index", "extra"), [(-100, ()), (2, ()), (-100, (2, 3))])
def test_alpha_one_equals_cross_entropy_loss_with_ignored_targets(
    reduction, s, ignore_index, extra
):
    z, t = logits_and_target(n=7, extra=extra)
    t = with_ignored(t, ignore_index)
    ref = z.detach().clone().requires_grad_()
    criterion = nn.CrossEntropyLoss(
        ignore_index=ignore_index, label_smoothing=s, reduction=reduction
    )
    expected = criterion(ref, t)
    got = powergrad_cross_entropy(
        z, t, 1.0, ignore_index=ignore_index, label_smoothing=s, reduction=reduction
    )
    # a few ulps of round-off on O(1) values
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-14)
    grad_out = torch.rand(got.shape, dtype=F64, generator=torch.Generator().manual_seed(1))
    got.backward(grad_out)
    expected.backward(grad_out)
    torch.testing.assert_close(z.grad, ref.grad, rtol=0, atol=1e-15)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_ignored_targets_get_no_gradient_and_kept_ones_follow_the_formula(reduction):
    z, t = logits_and_target(n=9)
    t = with_ignored(t, -100)
    kept = t != -100
    criterion = PowerGrad(alpha=0.3, label_smoothing=0.1, reduction=reduction)
    loss = criterion(z, t)  # default ignore_index = -100, as nn.CrossEntropyLoss
    expected = F.cross_entropy(z, t, label_smoothing=0.1, reduction=reduction)
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-14)
    loss.sum().backward()
    q = smoothed_onehot(t[kept], 5, 0.1)
    scale = 1 / int(kept.sum()) if reduction == "mean" else 1.0
    torch.testing.assert_close(
        z.grad[kept], (power_softmax(z[kept], 0.3) - q) * scale, rtol=0, atol=1e-15
    )
    assert torch.equal(z.grad[~kept], torch.zeros_like(z.grad[~kept]))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("alpha", [1.0, 0.3])
def test_all_ignored_batch_gives_torchs_result(reduction, alpha):
    z, _ = logits_and_target()
    t = torch.full((6,), -100)
    ref = z.detach().clone().requires_grad_()
    expected = F.cross_entropy(ref, t, label_smoothing=0.1, reduction=reduction)  # mean: nan
    got = powergrad_cross_entropy(z, t, alpha, label_smoothing=0.1, reduction=reduction)
    torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)
    got.sum().backward()
    expected.sum().backward()
    assert torch.equal(z.grad, ref.grad) and not z.grad.any()


def test_probability_targets_ignore_nothing():
    z, _ = logits_and_target()
    probs = torch.softmax(torch.randn(6, 5, dtype=F64), dim=1)
    powergrad_cross_entropy(z, probs, 0.4, ignore_index=-1).backward()
    expected = (power_softmax(z, 0.4) - probs) / 6
    torch.testing.assert_close(z.grad, expected, rtol=0, atol=1e-15)
    with pytest.raises(RuntimeError, match="ignore_index"):  # torch's own rule
        F.cross_entropy(z, probs, ignore_index=0)
    with pytest.raises(ValueError, match="ignore_index = 0 with a class-probability target"):
        powergrad_cross_entropy(z, probs, 0.4, ignore_index=0)


def test_unsupported_cross_entropy_arguments_are_refused_by_name():
    z, t = logits_and_target()
    for kwargs, words in [
        (dict(weight=torch.ones(5)), "weight .*per-class weights"),
        (dict(size_average=False), "size_average .*reduction="),
        (dict(reduce=False), "reduce .*reduction="),
    ]:
        with pytest.raises(ValueError, match=words):
            PowerGrad(**kwargs)
        with pytest.raises(ValueError, match=words):
            powergrad_cross_entropy(z, t, **kwargs)
    with pytest.raises(TypeError, match="not nn.CrossEntropyLoss's class weight"):
        PowerGrad(torch.ones(5))  # CrossEntropyLoss's first argument is the class weight
    with pytest.raises(TypeError, match="ignore_index"):
        PowerGrad(ignore_index=1.5)


# ---- identities ------------------------------------------------------------------------------
def test_alpha_one_training_step_equals_baseline_exactly():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    twin = copy.deepcopy(net)
    x, t = torch.randn(4, 2, 6, 6), torch.tensor([0, 4, 2, 2])
    for model, loss_fn in (
        (net, PowerGrad(alpha=1.0, label_smoothing=0.1)),
        (twin, lambda z, y: F.cross_entropy(z, y, label_smoothing=0.1)),
    ):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        loss_fn(model(x), t).backward()
        opt.step()
    for p, q in zip(net.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_eval_mode_is_plain_cross_entropy():
    z, t = logits_and_target()
    criterion = PowerGrad(alpha=0.25, label_smoothing=0.1).eval()
    criterion(z, t).backward()
    ref = z.detach().clone().requires_grad_()
    F.cross_entropy(ref, t, label_smoothing=0.1).backward()
    assert torch.equal(z.grad, ref.grad)
    criterion.train()
    z.grad = None
    criterion(z, t).backward()
    assert not torch.allclose(z.grad, ref.grad)


def test_no_grad_value_is_cross_entropy():
    z, t = logits_and_target()
    with torch.no_grad():
        got = PowerGrad(alpha=0.25)(z, t)
    torch.testing.assert_close(got, F.cross_entropy(z.detach(), t), rtol=0, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_logits_are_computed_in_float32(dtype):
    z64, t = logits_and_target()
    z = z64.detach().to(dtype).requires_grad_()
    loss = powergrad_cross_entropy(z, t, 0.25)
    assert loss.dtype == dtype
    loss.backward()
    assert z.grad.dtype == dtype
    zf = z.detach().to(F64)
    expected = (power_softmax(zf, 0.25) - smoothed_onehot(t, 5, 0.0)) / 6
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(z.grad.to(F64), expected, rtol=eps, atol=eps * 0.2)
    ce = F.cross_entropy(zf, t)
    torch.testing.assert_close(loss.to(F64), ce, rtol=eps, atol=0)


# ---- state -----------------------------------------------------------------------------------
def test_state_round_trip_also_inside_a_model():
    criterion = PowerGrad(alpha=0.3, label_smoothing=0.1)
    assert isinstance(criterion, GradientTransform)
    state = criterion.state_dict()
    fresh = PowerGrad()
    fresh.load_state_dict(state)
    assert (fresh.alpha, fresh.label_smoothing) == (0.3, 0.1)
    holder = nn.ModuleDict({"fc": nn.Linear(2, 2), "loss": criterion})
    other = nn.ModuleDict({"fc": nn.Linear(2, 2), "loss": PowerGrad()})
    other.load_state_dict(holder.state_dict())
    assert (other["loss"].alpha, other["loss"].label_smoothing) == (0.3, 0.1)
    with pytest.raises(ValueError, match="allow_sharpen"):
        PowerGrad().load_state_dict({"_extra_state": {"alpha": 2.0, "label_smoothing": 0.0}})
    with pytest.raises(ValueError, match="label_smoothing"):
        PowerGrad().load_state_dict({"_extra_state": {"alpha": 0.5}})
    criterion.remove()  # holds no hooks: a no-op
    carried = compose(criterion)
    assert carried.state_dict()["0"] == criterion.state_dict()


# ---- errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(alpha=0.0), ValueError, "alpha"),
        (dict(alpha=-1.0), ValueError, "alpha"),
        (dict(alpha=float("nan")), ValueError, "alpha"),
        (dict(alpha=1.5), ValueError, "allow_sharpen"),
        (dict(alpha=True), TypeError, "alpha"),
        (dict(label_smoothing=1.0), ValueError, "label_smoothing"),
        (dict(label_smoothing=-0.1), ValueError, "label_smoothing"),
        (dict(reduction="avg"), ValueError, "reduction"),
    ],
)
def test_bad_settings_raise(kwargs, error, words):
    with pytest.raises(error, match=words):
        PowerGrad(**kwargs)


def test_sharpening_allowed_with_flag():
    assert PowerGrad(alpha=1.5, allow_sharpen=True).alpha == 1.5


def test_bad_inputs_raise():
    z, t = logits_and_target()
    with pytest.raises(ValueError, match=r"\(5,\).*\(6, 5\)"):
        powergrad_cross_entropy(z, t[:5])
    with pytest.raises(ValueError, match=r"\(6, 4\).*\(6, 5\)"):
        powergrad_cross_entropy(z, torch.rand(6, 4, dtype=F64))
    with pytest.raises(ValueError, match="class index 5"):
        powergrad_cross_entropy(z, torch.tensor([0, 1, 2, 3, 4, 5]))
    with pytest.raises(ValueError, match="class index -1"):
        PowerGrad()(z, torch.tensor([0, 1, 2, 3, 4, -1]))
    with pytest.raises(ValueError, match="class index -100.*ignore_index = -1"):
        PowerGrad(ignore_index=-1)(z, torch.tensor([0, 1, 2, 3, -1, -100]))
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        powergrad_cross_entropy(z[0], t[0])
    with pytest.raises(TypeError, match="floating"):
        powergrad_cross_entropy(torch.ones(6, 5, dtype=torch.int64), t)
    with pytest.raises(ValueError, match="alpha"):
        powergrad_cross_entropy(z, t, 0.0)
    with pytest.raises(ValueError, match="reduction"):
        powergrad_cross_entropy(z, t, reduction="batchmean")


def test_docstring_examples_run():
    result = doctest.testmod(gradshape.powergrad)
    assert result.attempted > 0 and result.failed == 0
