"""One training run: method registry, schedule, measurements, pairing, resume, run folders."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from torch import nn

from gradshape import reparam
from gradshape.harness import train
from gradshape.harness.checkpoint import load_checkpoint
from gradshape.harness.config import (
    DataConfig,
    GridConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    SGSConfig,
)
from gradshape.harness.methods import METHODS, build_method, parse_method, resolve_method
from gradshape.harness.models import create_model

TIMING = ("seconds", "images_per_second")


def _cfg(method: str = "baseline", epochs: int = 2, **optim) -> RunConfig:
    return RunConfig(
        method=method,
        device="cpu",
        data=DataConfig("digits", subset=320),
        model=ModelConfig("tiny"),
        optim=OptimConfig(
            **{"batch_size": 32, "lr": 0.05, "warmup_epochs": 0.5, **optim}, epochs=epochs
        ),
        sgs=SGSConfig(refresh_warmup=1, refresh_every=1, refresh_batches=2),
    )


def _small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5), nn.ReLU(),
        nn.Conv2d(5, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    )  # fmt: skip


# ---- registry ----------------------------------------------------------------------------
def test_unknown_method_lists_every_valid_name():
    with pytest.raises(ValueError, match="unknown method 'sgd'") as err:
        parse_method("sgs+sgd")
    for name in METHODS:
        assert name in str(err.value)


@pytest.mark.parametrize("spec", ["acb+repvgg", "sgs+grid", "sgs-autocorr+sgs", "pgt+pgt"])
def test_parts_of_one_group_do_not_compose(spec):
    with pytest.raises(ValueError, match="do not compose"):
        parse_method(spec)


def test_baseline_combines_with_nothing():
    with pytest.raises(ValueError, match="'baseline' cannot be combined"):
        parse_method("baseline+cdg")


def test_overrides_and_forced_settings():
    _, cfg = resolve_method(dataclasses.replace(_cfg(), method="sgs@k=3"))
    assert cfg.sgs.k == 3.0 and cfg.method == "sgs@k=3"
    _, cfg = resolve_method(dataclasses.replace(_cfg(), method="grid@grid.alpha=2@beta=4"))
    assert (cfg.grid.alpha, cfg.grid.beta) == (2.0, 4.0)
    _, cfg = resolve_method(dataclasses.replace(_cfg(), method="sgs-autocorr"))
    assert cfg.sgs.measure == "autocorrelation"
    _, cfg = resolve_method(dataclasses.replace(_cfg(), method="sgs+pgt@alpha=0.5"))
    assert cfg.pgt.alpha == 0.5 and cfg.grid.alpha == GridConfig().alpha  # pgt's own alpha
    with pytest.raises(ValueError, match="ambiguous"):
        resolve_method(dataclasses.replace(_cfg(), method="sgs@alpha=2"))
    with pytest.raises(ValueError, match="expected a float"):
        resolve_method(dataclasses.replace(_cfg(), method="sgs@k=big"))
    with pytest.raises(ValueError, match="config sgs.k must be"):
        resolve_method(dataclasses.replace(_cfg(), method="sgs@k=-1"))


def _dense_cdg(g: torch.Tensor, a: float, lam: float) -> torch.Tensor:
    """M⁻¹ g along dim 0 by a dense float64 solve, M = P + a(I − P) + λ(−Δ) (periodic)."""
    n = g.shape[0]
    eye = torch.eye(n, dtype=torch.float64)
    p = torch.full((n, n), 1.0 / n, dtype=torch.float64)
    lap = 2 * eye - torch.roll(eye, 1, 0) - torch.roll(eye, -1, 0)
    m = p + a * (eye - p) + lam * lap
    return torch.linalg.solve(m, g.double().reshape(n, -1)).reshape(g.shape)


def test_sgs_then_cdg_gradient_is_cdg_of_scaled_gradient():
    x, y = torch.randn(4, 2, 7, 7), torch.tensor([0, 1, 2, 1])
    plain = _small_net()
    nn.functional.cross_entropy(plain(x), y).backward()
    model = _small_net()
    cfg = dataclasses.replace(_cfg(), method="sgs+cdg")
    state = build_method(model, cfg, lambda m: train.make_optimizer(m, cfg))
    assert set(state.transforms) == {"sgs", "cdg"} and state.needs_refresh
    g_scale = torch.arange(1.0, 10.0).reshape(3, 3)
    state.scaling.set_scaling("0", g_scale)
    nn.functional.cross_entropy(model(x), y).backward()
    expected = _dense_cdg(plain[0].weight.grad * g_scale, cfg.cdg.a, cfg.cdg.smoothing)
    torch.testing.assert_close(model[0].weight.grad.double(), expected, rtol=1e-5, atol=1e-7)
    # the 1x1 conv: no SGS (kernel 1), CDG only
    expected = _dense_cdg(plain[6].weight.grad, cfg.cdg.a, cfg.cdg.smoothing)
    torch.testing.assert_close(model[6].weight.grad.double(), expected, rtol=1e-5, atol=1e-7)


def test_grid_pins_the_parametric_scaling_on_3x3_convs():
    cfg = dataclasses.replace(_cfg(), method="grid@alpha=2@beta=4")
    _, cfg = resolve_method(cfg)
    state = build_method(_small_net(), cfg, lambda m: train.make_optimizer(m, cfg))
    assert not state.needs_refresh and not state.epoch_hooks
    assert sorted(state.scaling.scalings) == ["0", "3"]
    a, b = 1 / 2, 1 / 4
    raw = torch.tensor([[b, a, b], [a, 1, a], [b, a, b]], dtype=torch.float64)
    for g in state.scaling.scalings.values():
        torch.testing.assert_close(g.double(), (raw / raw.mean()).double())


def test_update_mode_attaches_to_the_adaptive_optimizer():
    cfg = dataclasses.replace(
        _cfg("sgs"),
        optim=dataclasses.replace(_cfg().optim, name="adam"),
        sgs=dataclasses.replace(_cfg().sgs, mode="update"),
    )
    state = build_method(_small_net(), cfg, lambda m: train.make_optimizer(m, cfg))
    assert isinstance(state.optimizer, torch.optim.Adam)
    assert state.scaling.mode == "update" and state.scaling.optimizer is state.optimizer


def test_structural_method_trains_a_converted_copy():
    model = _small_net()
    cfg = _cfg("acb")
    state = build_method(model, cfg, lambda m: train.make_optimizer(m, cfg))
    assert state.structural and state.model is not model
    owned = {id(p) for g in state.optimizer.param_groups for p in g["params"]}
    assert owned == {id(p) for p in state.model.parameters()}
    x = torch.randn(2, 2, 7, 7)
    deployed = state.deploy(state.model)
    assert reparam.max_output_difference(state.model, deployed, x) < 1e-5


# ---- schedule and measurements -----------------------------------------------------------
def test_warmup_cosine_schedule():
    total, warm, lr = 40, 8, 0.3
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, train.WarmupCosine(total, warm))
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(lr / warm)
    assert all(b > a for a, b in itertools.pairwise(lrs[:warm]))  # linear rise
    assert lrs[warm - 1] == pytest.approx(lr) and lrs[warm] == pytest.approx(lr)
    assert lrs[warm + (total - warm) // 2] == pytest.approx(lr / 2)  # cosine half-way
    assert all(b <= a for a, b in itertools.pairwise(lrs[warm:]))
    assert 0 < lrs[-1] < 1e-2 * lr


def test_kernel_magnitude_of_a_known_weight():
    conv = nn.Conv2d(2, 3, 3)
    o = torch.arange(1.0, 4.0).view(3, 1, 1, 1)
    sign = torch.tensor([1.0, -1.0]).view(1, 2, 1, 1)
    pos = torch.arange(1.0, 10.0).view(1, 1, 3, 3)
    with torch.no_grad():
        conv.weight.copy_(o * sign * pos)  # |W| = (o + 1)·(position + 1)
    model = nn.Sequential(conv, nn.Conv2d(3, 3, 1))
    mags = train.kernel_magnitude(model)
    assert list(mags) == ["0"]  # 1×1 convs have no spatial shape
    torch.testing.assert_close(
        torch.tensor(mags["0"], dtype=torch.float64), pos[0, 0].double() / 5.0
    )


# ---- runs --------------------------------------------------------------------------------
def _without_timing(history):
    return [{k: v for k, v in h.items() if k not in TIMING} for h in history]


def test_paired_runs_share_init_and_data_order(tmp_path):
    base = train.train_run(_cfg("baseline", 1), tmp_path / "b", progress=False)
    sgs = train.train_run(_cfg("sgs", 1), tmp_path / "s", progress=False)
    # G = 1 during SGS's warm-up epoch: the two runs must be the same computation
    assert _without_timing(base["history"]) == [
        {**h, "refreshed": False} for h in _without_timing(sgs["history"])
    ]
    a = load_checkpoint(tmp_path / "b" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "s" / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_record_of_a_structural_run(tmp_path):
    rec = train.train_run(_cfg("acb", 1), tmp_path, progress=False)
    assert rec["flags"]["structural"] and not rec["flags"]["needs_refresh"]
    assert rec["fusion_ok"] and rec["fusion_max_abs_diff"] < 1e-4
    assert abs(rec["test_acc"] - rec["test_acc_unfused"]) <= 0.01
    model = create_model("tiny", num_classes=10, in_channels=1)
    converted = reparam.convert(model, "acb").converted
    modules, bns = dict(model.named_modules()), reparam.following_batchnorms(model)
    # fusion: each converted conv gains a bias and absorbs the BatchNorm after it
    change = sum(
        modules[n].out_channels * (modules[n].bias is None)
        - sum(p.numel() for p in modules[bns[n]].parameters())
        for n in converted
    )
    assert rec["params_deployed"] == train.parameter_count(model) + change
    assert rec["params"] > rec["params_deployed"]
    assert set(rec["kernel_magnitude"]) <= set(modules)
    assert rec["scalings"] is None and rec["k"] is None


def straight_and_resumed(cfg: RunConfig, tmp_path, saves: int, monkeypatch) -> tuple[dict, dict]:
    """Train ``cfg`` in ``tmp_path/a``, and in ``tmp_path/b`` killed right after its
    ``saves``-th checkpoint and then resumed; checks that both end with the same weights,
    optimizer state and history (timings aside) and returns both records."""
    straight = train.train_run(cfg, tmp_path / "a", progress=False)
    real_save, epochs = train.save_checkpoint, []

    def interrupted_save(path, obj):
        real_save(path, obj)
        epochs.append(obj["epoch"])
        if len(epochs) == saves:
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "save_checkpoint", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        train.train_run(cfg, tmp_path / "b", progress=False)
    monkeypatch.setattr(train, "save_checkpoint", real_save)
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["epoch"] == epochs[-1]
    resumed = train.train_run(cfg, tmp_path / "b", resume=True, progress=False)

    a = load_checkpoint(tmp_path / "a" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(),
                      strict=True):  # fmt: skip
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert _without_timing(straight["history"]) == _without_timing(resumed["history"])
    return straight, resumed


def test_resume_equals_uninterrupted(tmp_path, monkeypatch):
    # killed right after epoch 2's checkpoint
    straight, resumed = straight_and_resumed(_cfg("sgs", 3), tmp_path, 2, monkeypatch)
    assert straight["scalings"] == resumed["scalings"]
    assert len(straight["scalings"]["history"]) == 2  # refreshed at epochs 1 and 2
    assert straight["test_acc"] == resumed["test_acc"]
    assert straight["kernel_magnitude"] == resumed["kernel_magnitude"]


def test_resume_refuses_changed_settings(tmp_path):
    train.train_run(_cfg("baseline", 1), tmp_path, progress=False)
    changed = _cfg("baseline", 1, lr=0.2)
    with pytest.raises(ValueError, match=r"config.yaml: .*different settings \(\['optim.lr'\]\)"):
        train.train_run(changed, tmp_path, resume=True, progress=False)
    (tmp_path / "config.yaml").unlink()  # a run folder made before config.yaml existed
    with pytest.raises(ValueError, match=r"run.json: .*different settings \(\['optim.lr'\]\)"):
        train.train_run(changed, tmp_path, resume=True, progress=False)
    (tmp_path / "run.json").unlink()  # as if interrupted after the last checkpoint
    with pytest.raises(ValueError, match=r"checkpoint.pt: .*\(\['optim.lr'\]\)"):
        train.train_run(changed, tmp_path, resume=True, progress=False)
    moved = dataclasses.replace(_cfg("baseline", 1), device="cpu:0")  # free to change
    assert train.train_run(moved, tmp_path, resume=True, progress=False)["epochs"] == 1


def test_existing_run_folder_is_never_overwritten_silently(tmp_path, monkeypatch):
    first = train.train_run(_cfg("baseline", 1), tmp_path, progress=False)
    with pytest.raises(train.RunExistsError, match="--overwrite"):
        train.train_run(_cfg("baseline", 1), tmp_path, progress=False)

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(train, "_train_epoch", no_training)
    assert train.train_run(_cfg("baseline", 1), tmp_path, resume=True) == first
    monkeypatch.undo()
    again = train.train_run(_cfg("baseline", 1), tmp_path, overwrite=True, progress=False)
    assert _without_timing(again["history"]) == _without_timing(first["history"])


def test_bad_device_and_amp_on_cpu_are_refused(tmp_path):
    with pytest.raises(ValueError, match="not a torch device"):
        train.resolve_device("gpu0")
    cfg = dataclasses.replace(_cfg(), amp=True)
    with pytest.raises(ValueError, match="mixed precision needs a CUDA device"):
        train.train_run(cfg, tmp_path, progress=False)


def test_evaluation_schedule_never_changes_what_is_trained(tmp_path):
    runs = {
        every: train.train_run(
            dataclasses.replace(_cfg("sgs", 3), eval_every=every),
            tmp_path / str(every),
            progress=False,
        )
        for every in (1, 2, 0)
    }
    evaluated = {
        every: [h["epoch"] for h in rec["history"] if h["test_acc"] is not None]
        for every, rec in runs.items()
    }
    assert evaluated == {1: [0, 1, 2], 2: [1, 2], 0: [2]}
    trained = ("train_loss", "train_acc", "lr", "images", "refreshed")
    reference = [{k: h[k] for k in trained} for h in runs[1]["history"]]
    models = {e: load_checkpoint(tmp_path / str(e) / "checkpoint.pt")["model"] for e in runs}
    for every, rec in runs.items():
        assert [{k: h[k] for k in trained} for h in rec["history"]] == reference
        assert rec["scalings"] == runs[1]["scalings"]
        assert rec["test_acc"] == runs[1]["test_acc"]
        assert all(torch.equal(models[every][k], models[1][k]) for k in models[1])


def test_fit_accuracy_is_measured_on_the_training_images(tmp_path):
    rec = train.train_run(_cfg("baseline", 1), tmp_path, progress=False)
    # digits has no augmentation: the fit loader sees exactly the training split
    model = create_model("tiny", num_classes=10, in_channels=1)
    model.load_state_dict(load_checkpoint(tmp_path / "checkpoint.pt")["model"])
    data = train.load_dataset("digits", subset=320, seed=0)
    loader = train.make_loader(data.train, 256, shuffle=False, seed=0)
    assert rec["train_eval_acc"] == train.evaluate(model, loader, torch.device("cpu"))


def test_branch_method_pins_lemma_one_scalings_unnormalised():
    cfg = dataclasses.replace(_cfg(), method="branch@kind=acb")
    _, cfg = resolve_method(cfg)
    state = build_method(_small_net(), cfg, lambda m: train.make_optimizer(m, cfg))
    assert not state.epoch_hooks
    assert sorted(state.scaling.scalings) == ["0", "3"]  # the 1x1 conv has no branches
    acb = torch.tensor([[1, 2, 1], [2, 3, 2], [1, 2, 1]], dtype=torch.float64)
    for g in state.scaling.scalings.values():
        torch.testing.assert_close(g.double(), acb, rtol=0, atol=0)
    _, cfg = resolve_method(dataclasses.replace(_cfg(), method="branch@kind=repvgg"))
    assert cfg.branch.kind == "repvgg"


def test_parallel_compare_equals_sequential(tmp_path):
    from gradshape.harness.compare import compare

    cfg = _cfg("baseline", 1)
    methods, seeds = ["baseline", "grid"], [0, 1]
    one = compare(cfg, methods, seeds, tmp_path / "one", progress=False, report=False)
    two = compare(cfg, methods, seeds, tmp_path / "two", progress=False, report=False, jobs=2)
    assert [(r["method"], r["seed"]) for r in two] == [(r["method"], r["seed"]) for r in one]
    for a, b in zip(one, two):
        assert _without_timing(a["history"]) == _without_timing(b["history"])
        assert a["test_acc"] == b["test_acc"] and a["scalings"] == b["scalings"]
    with pytest.raises(ValueError, match="jobs must be an int >= 1"):
        compare(cfg, methods, seeds, tmp_path / "three", jobs=0)
