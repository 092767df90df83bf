"""SpatialGradientScaling: Lemma 1, hooks, refresh, schedule, state and errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradshape as gs
from gradshape.dependence import spatial_dependence


def small_net(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.Conv2d(8, 8, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    ).to(dtype)


def data(n=8, seed=1, dtype=torch.float32, size=10):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g, dtype=dtype), torch.randint(
        0, 4, (n,), generator=g
    )


# ---- Lemma 1 --------------------------------------------------------------------------------
class ACBLayer(nn.Module):
    """3x3 + 1x3 + 3x1 convs summed, written here independently of gradshape.reparam."""

    def __init__(self, cin, cout, merged: torch.Tensor):
        super().__init__()
        kw = dict(bias=False, dtype=merged.dtype)
        self.square = nn.Conv2d(cin, cout, 3, padding=1, **kw)
        self.hor = nn.Conv2d(cin, cout, (1, 3), padding=(0, 1), **kw)
        self.ver = nn.Conv2d(cin, cout, (3, 1), padding=(1, 0), **kw)
        with torch.no_grad():
            # Any split summing to the merged kernel works; use a non-trivial one.
            self.hor.weight.copy_(0.3 * merged[:, :, 1:2, :])
            self.ver.weight.copy_(-0.2 * merged[:, :, :, 1:2])
            self.square.weight.copy_(merged - self._pad(self.hor.weight, self.ver.weight))

    @staticmethod
    def _pad(h, v):
        return F.pad(h, (0, 0, 1, 1)) + F.pad(v, (1, 1, 0, 0))

    def merged(self):
        return self.square.weight + self._pad(self.hor.weight, self.ver.weight)

    def forward(self, x):
        return self.square(x) + self.hor(x) + self.ver(x)


def acb_pair(seed=0):
    torch.manual_seed(seed)
    plain = nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1, bias=False),
        nn.BatchNorm2d(5),
        nn.ReLU(),
        nn.Conv2d(5, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).double()
    branched = copy.deepcopy(plain)
    for i in (0, 3):
        conv = plain[i]
        branched[i] = ACBLayer(conv.in_channels, conv.out_channels, conv.weight.detach())
    return plain, branched


def train(model, steps, seed=5, **opt):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, **opt)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(6, 3, 7, 7, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (6,), generator=g)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def test_lemma1_acb_equals_sgs_in_float64():
    plain, branched = acb_pair()
    sgs = gs.SpatialGradientScaling(plain)
    for name in ("0", "3"):
        sgs.set_scaling(name, gs.branch_scaling("acb", 3))
    opt = dict(momentum=0.9, nesterov=True, weight_decay=1e-3)
    train(plain, 35, **opt)
    train(branched, 35, **opt)
    for i in (0, 3):
        merged = branched[i].merged().detach()
        assert (merged - plain[i].weight.detach()).abs().max().item() < 1e-10
    assert (branched[8].weight - plain[8].weight).abs().max().item() < 1e-10

    # Without the scaling the trajectories separate clearly.
    plain2, branched2 = acb_pair()
    train(plain2, 35, **opt)
    train(branched2, 35, **opt)
    assert (branched2[0].merged() - plain2[0].weight).abs().max().item() > 1e-3


# ---- hooks ----------------------------------------------------------------------------------
def grads(model, x, y):
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_gradient_mode_multiplies_conv_weight_grads_only():
    model = small_net(torch.float64)
    x, y = data(dtype=torch.float64)
    plain = grads(model, x, y)
    sgs = gs.SpatialGradientScaling(model)
    assert set(sgs.scalings) == {"0", "3"}  # the 1x1 conv "5" is not eligible
    assert "5" in sgs.skipped and "nothing to scale" in sgs.skipped["5"]
    g0 = torch.rand(3, 3, dtype=torch.float64) + 0.5
    per_channel = torch.rand(8, 3, 3, dtype=torch.float64) + 0.5
    sgs.set_scaling("0", g0)
    sgs.set_scaling("3", per_channel)
    scaled = grads(model, x, y)
    torch.testing.assert_close(scaled["0.weight"], plain["0.weight"] * g0, rtol=1e-12, atol=0)
    torch.testing.assert_close(
        scaled["3.weight"], plain["3.weight"] * per_channel[:, None], rtol=1e-12, atol=0
    )
    for name in plain:
        if name not in ("0.weight", "3.weight"):
            torch.testing.assert_close(scaled[name], plain[name], rtol=0, atol=0)
    sgs.remove()
    sgs.remove()  # idempotent
    after = grads(model, x, y)
    for name in plain:
        torch.testing.assert_close(after[name], plain[name], rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["gradient", "update"])
def test_per_weight_scaling_multiplies_each_entry(mode):
    """G of the weight's full shape (RepOptimizers' identity term needs it), used as given."""
    x, y = data(dtype=torch.float64)
    plain_model, model = small_net(torch.float64), small_net(torch.float64)
    model.load_state_dict(plain_model.state_dict())
    weight = model[3].weight
    g = torch.rand_like(weight) + 0.5
    g[torch.arange(weight.shape[0]), torch.arange(weight.shape[0]) % weight.shape[1], 1, 1] += 1
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    ref_opt = torch.optim.SGD(plain_model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    kwargs = {"optimizer": opt} if mode == "update" else {}
    sgs = gs.SpatialGradientScaling(model, mode=mode, include=["3"], **kwargs)
    sgs.set_scaling("3", g)
    torch.testing.assert_close(sgs.scalings["3"], g, rtol=0, atol=0)  # not normalised
    for _ in range(3):
        for net, o in ((model, opt), (plain_model, ref_opt)):
            o.zero_grad()
            F.cross_entropy(net(x), y).backward()
        if mode == "gradient":
            plain_model[3].weight.grad.mul_(g)  # the hand-multiplied gradient
            ref_opt.step()
        else:
            before = plain_model[3].weight.detach().clone()
            ref_opt.step()
            with torch.no_grad():
                plain_model[3].weight.copy_(before + g * (plain_model[3].weight - before))
        opt.step()
    torch.testing.assert_close(model[3].weight, plain_model[3].weight, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match=r"'3' has shape \(8, 5, 3, 3\).*weight's shape"):
        sgs.set_scaling("3", torch.ones(8, 5, 3, 3))
    state = sgs.state_dict()
    sgs.remove()
    fresh = gs.SpatialGradientScaling(model, mode=mode, include=["3"], **kwargs)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.scalings["3"], g, rtol=0, atol=0)
    fresh.remove()


def test_update_mode_scales_the_adam_step():
    model = small_net(torch.float64)
    reference = copy.deepcopy(model)
    x, y = data(dtype=torch.float64)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ref_opt = torch.optim.Adam(reference.parameters(), lr=1e-2)
    sgs = gs.SpatialGradientScaling(model, mode="update", optimizer=opt)
    g = gs.grid_scaling(2.0, 4.0)
    sgs.set_scaling("0", g)
    for _ in range(3):
        before = reference[0].weight.detach().clone()
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
        with torch.no_grad():  # the same rule applied by hand to the reference
            reference[0].weight.copy_(before + g * (reference[0].weight - before))
    torch.testing.assert_close(model[0].weight, reference[0].weight, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(model[3].weight, reference[3].weight, rtol=1e-12, atol=1e-14)


def test_attaching_twice_raises_and_remove_allows_again():
    model = small_net()
    first = gs.SpatialGradientScaling(model)
    with pytest.raises(ValueError, match="already has a SpatialGradientScaling"):
        gs.SpatialGradientScaling(model)
    first.remove()
    with gs.SpatialGradientScaling(model) as second:
        assert second.attached
    assert not second.attached


def test_attach_keeps_classes_keys_and_parameters():
    model = small_net()
    keys = list(model.state_dict())
    params = [id(p) for p in model.parameters()]
    classes = [type(m) for m in model.modules()]
    sgs = gs.SpatialGradientScaling(model)
    assert list(model.state_dict()) == keys
    assert [id(p) for p in model.parameters()] == params
    assert [type(m) for m in model.modules()] == classes
    sgs.remove()


# ---- refresh --------------------------------------------------------------------------------
def captured_inputs(model, names, batches):
    store = {n: [] for n in names}
    handles = [
        dict(model.named_modules())[n].register_forward_hook(
            lambda m, a, o, n=n: store[n].append(a[0].detach().clone())
        )
        for n in names
    ]
    model.eval()
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in handles:
        h.remove()
    return store


@pytest.mark.parametrize("measure", ["nmi", "autocorrelation"])
def test_refresh_equals_dependence_of_captured_inputs(measure):
    model = small_net()
    batches = [data(seed=s)[0] for s in range(3)]
    sgs = gs.SpatialGradientScaling(model, k=3.0, measure=measure)
    model.train()
    assert sgs.refresh(batches) is sgs
    assert model.training and model[1].training  # modes restored
    inputs = captured_inputs(model, ["0", "3"], batches)
    for name in ("0", "3"):
        conv = dict(model.named_modules())[name]
        s = spatial_dependence(
            inputs[name], conv.kernel_size, padding=conv.padding, measure=measure
        )
        expected = gs.dependence_to_scaling(s, 3.0).float()
        torch.testing.assert_close(sgs.scalings[name], expected, rtol=1e-6, atol=1e-6)
        assert sgs.scalings[name].mean().item() == pytest.approx(1.0, abs=1e-5)


def test_refresh_accepts_tensors_tuples_generators_and_dicts():
    class KeywordNet(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, images):
            return self.net(images)

    model = small_net()
    pairs = [data(seed=s) for s in range(2)]
    results = []
    for batches in (
        [x for x, _ in pairs],
        pairs,
        (p for p in pairs),
    ):
        sgs = gs.SpatialGradientScaling(model).refresh(batches)
        results.append(sgs.scalings)
        sgs.remove()
    wrapped = KeywordNet(model)
    sgs = gs.SpatialGradientScaling(wrapped).refresh([{"images": x} for x, _ in pairs])
    results.append({n.removeprefix("net."): g for n, g in sgs.scalings.items()})
    for other in results[1:]:
        for n in results[0]:
            torch.testing.assert_close(other[n], results[0][n], rtol=0, atol=0)


def test_refresh_keeps_pinned_layers_and_restores_per_module_modes():
    model = small_net()
    model.train()
    model[1].eval()  # a frozen BN stays frozen
    sgs = gs.SpatialGradientScaling(model)
    pinned = gs.branch_scaling("repvgg", 3)
    sgs.set_scaling("3", pinned)
    sgs.refresh([data()[0]])
    torch.testing.assert_close(sgs.scalings["3"], pinned)
    assert not torch.equal(sgs.scalings["0"], torch.ones(3, 3))
    assert model.training and not model[1].training
    assert all(p.grad is None for p in model.parameters())  # ran under no_grad


def test_refresh_of_degenerate_inputs_is_finite_and_warns():
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 3, 3, padding=1))
    sgs = gs.SpatialGradientScaling(model, include=["0"])
    with pytest.warns(RuntimeWarning, match="'0'.*all ones"):
        sgs.refresh([torch.zeros(4, 2, 6, 6)])
    torch.testing.assert_close(sgs.scalings["0"], torch.ones(3, 3))
    x = torch.rand(4, 2, 6, 6)
    x[:, 1] = 3.0  # one constant channel: skipped, the other decides
    sgs.refresh([x])
    g = sgs.scalings["0"]
    assert torch.isfinite(g).all() and (g > 0).all()
    assert g.mean().item() == pytest.approx(1.0, abs=1e-6)


def test_conv1d_conv3d_dilation_groups_and_padding_modes():
    model = nn.Sequential(
        nn.Conv1d(4, 4, 5, padding=4, dilation=2, groups=4, padding_mode="reflect"),
        nn.ReLU(),
        nn.Conv1d(4, 6, 4, padding="same"),
    )
    sgs = gs.SpatialGradientScaling(model, even_kernels=True).refresh([torch.rand(3, 4, 30)])
    assert sgs.scalings["0"].shape == (5,) and sgs.scalings["2"].shape == (4,)
    x = torch.rand(3, 4, 30)
    inputs = captured_inputs(model, ["0"], [x])["0"]
    s = spatial_dependence(inputs, (5,), dilation=2, padding=4, padding_mode="reflect")
    torch.testing.assert_close(sgs.refresh([x]).scalings["0"], gs.dependence_to_scaling(s).float())
    sgs.remove()
    conv3 = nn.Sequential(nn.Conv3d(2, 3, 3, padding=1))
    g = gs.SpatialGradientScaling(conv3).refresh([torch.rand(2, 2, 5, 5, 5)]).scalings["0"]
    assert g.shape == (3, 3, 3) and (g > 0).all()


# ---- schedule -------------------------------------------------------------------------------
def test_schedule_due_epochs():
    # The authors' rule (default): the warm-up epoch, then every epoch divisible by `every`.
    s = gs.RefreshSchedule(warmup=1, every=30, batches=20)
    assert [e for e in range(100) if s.due(e)] == [1, 30, 60, 90]
    paper = gs.RefreshSchedule(warmup=1, every=5)
    assert [e for e in range(30) if paper.due(e)] == [1, 5, 10, 15, 20, 25]
    assert [e for e in range(20) if gs.RefreshSchedule(warmup=7, every=5).due(e)] == [7, 10, 15]
    # Counted from the warm-up instead.
    s = gs.RefreshSchedule(warmup=1, every=30, batches=20, align="warmup")
    assert [e for e in range(100) if s.due(e)] == [1, 31, 61, 91]
    for align in ("paper", "warmup"):
        every2 = gs.RefreshSchedule(warmup=0, every=2, align=align)
        assert [e for e in range(5) if every2.due(e)] == [0, 2, 4]
        once = gs.RefreshSchedule(warmup=1, every=1000, align=align)  # frozen after epoch 1
        assert [e for e in range(100) if once.due(e)] == [1]
    with pytest.raises(ValueError, match="align"):
        gs.RefreshSchedule(align="epochs")
    with pytest.raises(ValueError, match="every"):
        gs.RefreshSchedule(every=0)


def loader(seed=0, n=40):
    x, y = data(n=n, seed=seed)
    ds = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True)


def test_maybe_refresh_follows_schedule_and_is_reproducible():
    runs = []
    for _ in range(2):
        model = small_net()
        sgs = gs.SpatialGradientScaling(
            model, schedule=gs.RefreshSchedule(warmup=1, every=2, batches=2, align="warmup")
        )
        done = [e for e in range(6) if sgs.maybe_refresh(e, loader())]
        assert done == [1, 3, 5]
        assert not sgs.maybe_refresh(5, loader())  # once per epoch
        assert [e for e, _ in sgs.history] == [1, 3, 5]
        runs.append(sgs.scalings)
        sgs.remove()
    for n in runs[0]:
        torch.testing.assert_close(runs[0][n], runs[1][n], rtol=0, atol=0)


# ---- state ----------------------------------------------------------------------------------
def test_state_dict_round_trip_continues_identically():
    model = small_net(torch.float64)
    sgs = gs.SpatialGradientScaling(model, k=2.0)
    sgs.refresh([data(dtype=torch.float64)[0]], epoch=1)
    sgs.set_scaling("3", gs.branch_scaling("acb", 3))
    state = sgs.state_dict()

    clone = copy.deepcopy(model)
    sgs.remove()
    restored = gs.SpatialGradientScaling(clone, k=5.0)
    restored.load_state_dict(state)
    assert restored.k == 2.0 and restored.refresh_count == 1 and restored.last_refresh_epoch == 1
    for n, g in state["scalings"].items():
        torch.testing.assert_close(restored.scalings[n], g, rtol=0, atol=0)
    sgs2 = gs.SpatialGradientScaling(model)
    sgs2.load_state_dict(state)
    x, y = data(dtype=torch.float64)
    a, b = grads(model, x, y), grads(clone, x, y)
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=0)
    # pinned layers stay pinned after loading
    restored.refresh([data()[0].double()])
    torch.testing.assert_close(restored.scalings["3"], gs.branch_scaling("acb", 3))


def test_load_state_dict_validates():
    model = small_net()
    sgs = gs.SpatialGradientScaling(model)
    state = sgs.state_dict()
    bad = copy.deepcopy(state)
    bad["scalings"]["zzz"] = bad["scalings"].pop("0")
    with pytest.raises(ValueError, match="layers differ"):
        sgs.load_state_dict(bad)
    bad = copy.deepcopy(state)
    bad["scalings"]["0"] = torch.ones(2, 2)
    with pytest.raises(ValueError, match="'0' has shape"):
        sgs.load_state_dict(bad)
    bad = copy.deepcopy(state)
    bad["settings"]["mode"] = "update"
    with pytest.raises(ValueError, match="mode"):
        sgs.load_state_dict(bad)
    with pytest.raises(TypeError):
        sgs.load_state_dict([1, 2])


# ---- errors ---------------------------------------------------------------------------------
def test_bad_construction_arguments():
    model = small_net()
    with pytest.raises(ValueError, match="has 1 convolution and none to act on: 1 with a 1x1"):
        gs.SpatialGradientScaling(nn.Sequential(nn.Linear(3, 3), nn.Conv2d(3, 3, 1)))
    with pytest.raises(ValueError, match="k must be"):
        gs.SpatialGradientScaling(model, k=0)
    with pytest.raises(ValueError, match="unknown measure 'mi'"):
        gs.SpatialGradientScaling(model, measure="mi")
    with pytest.raises(ValueError, match="unknown mode 'grad'"):
        gs.SpatialGradientScaling(model, mode="grad")
    with pytest.raises(ValueError, match="needs the optimizer"):
        gs.SpatialGradientScaling(model, mode="update")
    with pytest.raises(ValueError, match="kernel \\(1, 1\\).*'5'"):
        gs.SpatialGradientScaling(model, include=["5"])
    with pytest.raises(TypeError, match="torch.nn.Module"):
        gs.SpatialGradientScaling("model")
    tied = nn.Sequential(nn.Conv2d(3, 3, 3), nn.Conv2d(3, 3, 3))
    tied[1].weight = tied[0].weight
    with pytest.raises(ValueError, match="share one weight"):
        gs.SpatialGradientScaling(tied)
    with pytest.raises(ValueError, match="transposed"):
        gs.SpatialGradientScaling(nn.Sequential(nn.ConvTranspose2d(3, 3, 3)), include=["0"])


def test_bad_scalings_and_batches():
    model = small_net()
    sgs = gs.SpatialGradientScaling(model)
    with pytest.raises(ValueError, match="shape \\(2, 2\\)"):
        sgs.set_scaling("0", torch.ones(2, 2))
    with pytest.raises(ValueError, match="strictly positive"):
        sgs.set_scaling("0", torch.zeros(3, 3))
    with pytest.raises(ValueError, match="strictly positive"):
        sgs.set_scaling("0", torch.full((3, 3), float("nan")))
    with pytest.raises(KeyError, match="no scaled layer named 'nope'"):
        sgs.set_scaling("nope", torch.ones(3, 3))
    with pytest.raises(ValueError, match="empty"):
        sgs.refresh([])
    with pytest.raises(TypeError, match="refresh batches"):
        sgs.refresh([3])
    nan_batch = data()[0]
    nan_batch[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="'0' contains NaN or inf"):
        sgs.refresh([nan_batch])
    torch.testing.assert_close(sgs.scalings["0"], torch.ones(3, 3))  # unchanged after failure
