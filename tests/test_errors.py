"""Every public entry point rejects bad arguments with a ValueError/TypeError naming the culprit.

One table row per message: the call, the exception type and a pattern that must appear in the
message (the argument, module or layer at fault).  A failed call must leave state unchanged.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import gradshape as gs
from gradshape.dependence import PairGeometry

NAN = math.nan


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3))


def images(channels=3):
    return torch.rand(2, channels, 6, 6, generator=torch.Generator().manual_seed(0))


def construct(**kwargs):
    def call():
        gs.SpatialGradientScaling(model(), **kwargs).remove()

    return call


def other_optimizer():
    return torch.optim.SGD(model().parameters(), lr=0.1)


CONSTRUCTION = [
    ("k", construct(k="5"), TypeError, "k must be a real number"),
    ("k", construct(k=NAN), ValueError, "k must be finite and > 0"),
    ("k", construct(k=-1.0), ValueError, "k must be finite and > 0"),
    ("measure", construct(measure="mi"), ValueError, "unknown measure 'mi'"),
    ("mode", construct(mode="grad"), ValueError, "unknown mode 'grad'"),
    ("optimizer", construct(mode="update"), ValueError, "mode='update'.*needs the optimizer"),
    (
        "optimizer",
        construct(mode="update", optimizer="sgd"),
        TypeError,
        "optimizer must be a torch.optim.Optimizer, got str",
    ),
    (
        "optimizer",
        construct(optimizer=other_optimizer()),
        ValueError,
        "optimizer= is only used with mode='update'",
    ),
    (
        "optimizer",
        construct(mode="update", optimizer=other_optimizer()),
        ValueError,
        r"optimizer does not hold the weights of \['0', '2'\]",
    ),
    ("include", construct(include=3), TypeError, "include must be module names/patterns"),
    ("exclude", construct(exclude=[3]), TypeError, "exclude must be module names/patterns"),
    (
        "include",
        construct(include=["nope"]),
        ValueError,
        r"has 2 convolutions and none to act on \(include=\['nope'\] selects no eligible one\)",
    ),
    (
        "exclude",
        construct(exclude="*"),
        ValueError,
        r"has 2 convolutions and none to act on: 2 excluded \(e.g. '0': excluded\)",
    ),
    ("diag_removal", construct(diag_removal="yes"), TypeError, "diag_removal must be a bool"),
    ("schedule", construct(schedule={"every": 2}), TypeError, "schedule must be a RefreshSchedule"),
    ("floor", construct(floor="0.1"), TypeError, "floor must be a real number, got str"),
    ("floor", construct(floor=0.0), ValueError, r"floor must lie in \(0, 1\], got 0.0"),
    ("floor", construct(floor=NAN), ValueError, "floor must lie in"),
    ("seed", construct(seed=1.5), TypeError, "seed must be an int, got float"),
    ("engine", construct(engine="gpu"), ValueError, "engine must be 'auto', 'compiled' or 'torch'"),
    (
        "model",
        lambda: gs.SpatialGradientScaling(nn.Linear(2, 2)),
        ValueError,
        r"Linear has 0 convolutions and none to act on \(SGS scales Conv1d/Conv2d/Conv3d",
    ),
    ("model", lambda: gs.SpatialGradientScaling(None), TypeError, "model must be a torch.nn"),
]


@pytest.mark.parametrize(
    "call,error,pattern", [pytest.param(*row[1:], id=row[0]) for row in CONSTRUCTION]
)
def test_construction_arguments(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


# ---- methods of an attached instance -----------------------------------------------------------
@pytest.fixture
def sgs():
    transform = gs.SpatialGradientScaling(model())
    yield transform
    transform.remove()


METHODS = [
    ("refresh-batches", lambda s: s.refresh(5), TypeError, r"refresh: batches must be an iterable"),
    ("refresh-None", lambda s: s.refresh(None), TypeError, r"refresh: batches must be an iterable"),
    ("refresh-empty", lambda s: s.refresh([]), ValueError, "the batch iterable is empty"),
    ("refresh-item", lambda s: s.refresh(["x"]), TypeError, "refresh batches must be tensors"),
    (
        "refresh-epoch",
        lambda s: s.refresh([images()], epoch="1"),
        TypeError,
        "refresh: epoch must be an int, got str",
    ),
    (
        "refresh-integer-input",
        lambda s: s.refresh([torch.ones(2, 3, 6, 6, dtype=torch.long)]),
        TypeError,
        "input of '0' must be a floating tensor",
    ),
    (
        "refresh-inf",
        lambda s: s.refresh([images().index_fill_(0, torch.tensor([1]), math.inf)]),
        ValueError,
        "input of '0' contains NaN or inf",
    ),
    (
        "maybe_refresh-epoch",
        lambda s: s.maybe_refresh(1.0, [images()]),
        TypeError,
        "maybe_refresh: epoch must be an int, got float",
    ),
    (
        "maybe_refresh-negative",
        lambda s: s.maybe_refresh(-1, [images()]),
        ValueError,
        r"maybe_refresh: epoch must be >= 0",
    ),
    (
        "maybe_refresh-loader",
        lambda s: s.maybe_refresh(1, None),
        TypeError,
        "maybe_refresh: loader must be a DataLoader or an iterable",
    ),
    (
        "set_scaling-name",
        lambda s: s.set_scaling("9", torch.ones(3, 3)),
        KeyError,
        "no scaled layer named '9'",
    ),
    (
        "set_scaling-shape",
        lambda s: s.set_scaling("0", torch.ones(2, 2)),
        ValueError,
        r"scaling for '0' has shape \(2, 2\); expected the kernel shape \(3, 3\)",
    ),
    (
        "set_scaling-type",
        lambda s: s.set_scaling("0", "ones"),
        TypeError,
        "scaling for '0' must be a real tensor",
    ),
    (
        "set_scaling-complex",
        lambda s: s.set_scaling("0", torch.ones(3, 3, dtype=torch.complex64)),
        TypeError,
        "scaling for '0' must be real",
    ),
    (
        "set_scaling-negative",
        lambda s: s.set_scaling("0", -torch.ones(3, 3)),
        ValueError,
        "scaling for '0' must be finite and strictly positive",
    ),
    (
        "set_scaling-inf",
        lambda s: s.set_scaling("0", torch.full((3, 3), math.inf)),
        ValueError,
        "scaling for '0' must be finite and strictly positive",
    ),
    ("unpin", lambda s: s.unpin("9"), KeyError, "unpin: no scaled layer named '9'"),
]


@pytest.mark.parametrize("call,error,pattern", [pytest.param(*r[1:], id=r[0]) for r in METHODS])
def test_method_arguments_and_state_is_unchanged(sgs, call, error, pattern):
    before = sgs.state_dict()
    with pytest.raises(error, match=pattern):
        call(sgs)
    after = sgs.state_dict()
    assert after["refresh_count"] == before["refresh_count"] and after["pinned"] == []
    for name, g in before["scalings"].items():
        assert torch.equal(after["scalings"][name], g)


def corrupt(edit):
    def make(state):
        state = copy.deepcopy(state)
        edit(state)
        return state

    return make


LOAD = [
    ("not-a-mapping", lambda s: [1, 2], TypeError, "load_state_dict expects a mapping"),
    ("missing", corrupt(lambda s: s.pop("scalings")), ValueError, r"missing keys \['scalings'\]"),
    (
        "settings",
        corrupt(lambda s: s.__setitem__("settings", [1])),
        TypeError,
        r"state_dict\['settings'\] must be a mapping",
    ),
    (
        "scalings",
        corrupt(lambda s: s.__setitem__("scalings", [1])),
        TypeError,
        r"state_dict\['scalings'\] must be a mapping",
    ),
    (
        "layers",
        corrupt(lambda s: s["scalings"].__setitem__("9", s["scalings"].pop("0"))),
        ValueError,
        r"layers differ \(in state only: \['9'\], in model only: \['0'\]\)",
    ),
    (
        "scaling-shape",
        corrupt(lambda s: s["scalings"].__setitem__("2", torch.ones(2))),
        ValueError,
        r"scaling for '2' has shape \(2,\)",
    ),
    (
        "scaling-value",
        corrupt(lambda s: s["scalings"].__setitem__("2", torch.zeros(3, 3))),
        ValueError,
        "scaling for '2' must be finite and strictly positive",
    ),
    (
        "mode",
        corrupt(lambda s: s["settings"].__setitem__("mode", "update")),
        ValueError,
        "saved in mode 'update', this instance is in mode 'gradient'",
    ),
    ("k", corrupt(lambda s: s["settings"].__setitem__("k", 0)), ValueError, "k must be finite"),
    (
        "measure",
        corrupt(lambda s: s["settings"].__setitem__("measure", "mi")),
        ValueError,
        "load_state_dict: unknown measure 'mi'",
    ),
    (
        "floor",
        corrupt(lambda s: s["settings"].__setitem__("floor", 5)),
        ValueError,
        r"load_state_dict: floor must lie in \(0, 1\]",
    ),
    (
        "seed",
        corrupt(lambda s: s["settings"].__setitem__("seed", "x")),
        TypeError,
        r"settings\['seed'\] must be an int",
    ),
    (
        "diag_removal",
        corrupt(lambda s: s["settings"].__setitem__("diag_removal", "no")),
        TypeError,
        r"settings\['diag_removal'\] must be a bool",
    ),
    (
        "schedule-key",
        corrupt(lambda s: s["settings"].__setitem__("schedule", {"bogus": 1})),
        TypeError,
        r"settings\['schedule'\] is not a schedule.*bogus",
    ),
    (
        "schedule-value",
        corrupt(lambda s: s["settings"]["schedule"].__setitem__("every", 0)),
        ValueError,
        "RefreshSchedule.every must be an int >= 1",
    ),
    (
        "pinned",
        corrupt(lambda s: s.__setitem__("pinned", ["9"])),
        ValueError,
        r"'pinned' must list layers of this model, got \['9'\]",
    ),
    (
        "refresh_count",
        corrupt(lambda s: s.__setitem__("refresh_count", -1)),
        ValueError,
        "'refresh_count' must be an int >= 0, got -1",
    ),
    (
        "last_refresh_epoch",
        corrupt(lambda s: s.__setitem__("last_refresh_epoch", "3")),
        TypeError,
        "'last_refresh_epoch': epoch must be an int",
    ),
    (
        "history",
        corrupt(lambda s: s.__setitem__("history", [3])),
        ValueError,
        r"'history' must be a list of \(epoch, \{layer: scaling\}\) pairs",
    ),
]


@pytest.mark.parametrize("edit,error,pattern", [pytest.param(*r[1:], id=r[0]) for r in LOAD])
def test_load_state_dict_validates_everything_before_changing_anything(sgs, edit, error, pattern):
    sgs.set_scaling("2", gs.grid_scaling(2.0, 3.0))
    good = sgs.state_dict()
    fresh = gs.SpatialGradientScaling(model(), k=2.0)
    with pytest.raises(error, match=pattern):
        fresh.load_state_dict(edit(good))
    assert fresh.k == 2.0 and fresh.state_dict()["pinned"] == []
    assert all(torch.equal(g, torch.ones(3, 3)) for g in fresh.scalings.values())
    fresh.load_state_dict(good)  # the intact state still loads
    assert torch.equal(fresh.scalings["2"], good["scalings"]["2"])
    fresh.remove()


# ---- pure functions ------------------------------------------------------------------------------
X = images()
FUNCTIONS = [
    (
        "spatial_dependence-inputs",
        lambda: gs.spatial_dependence("maps", (3, 3)),
        TypeError,
        "spatial_dependence: inputs must be a tensor",
    ),
    (
        "spatial_dependence-item",
        lambda: gs.spatial_dependence([X, "map"], (3, 3)),
        TypeError,
        "must be a floating tensor, got str",
    ),
    (
        "spatial_dependence-empty",
        lambda: gs.spatial_dependence([], (3, 3)),
        ValueError,
        "spatial_dependence: no feature maps given",
    ),
    (
        "spatial_dependence-dims",
        lambda: gs.spatial_dependence(X[0], (3, 3)),
        ValueError,
        r"has shape \(3, 6, 6\); expected \(N, C\) followed by 2 spatial dims",
    ),
    (
        "spatial_dependence-channels",
        lambda: gs.spatial_dependence([X, images(4)], (3, 3)),
        ValueError,
        "changed from 3 to 4 channels",
    ),
    (
        "spatial_dependence-nan",
        lambda: gs.spatial_dependence(X * NAN, (3, 3)),
        ValueError,
        "contains NaN or inf",
    ),
    (
        "kernel_size-int",
        lambda: gs.spatial_dependence(X, 3),
        TypeError,
        "kernel_size must be a sequence of ints",
    ),
    (
        "kernel_size-float",
        lambda: gs.spatial_dependence(X, (2.5, 3)),
        TypeError,
        r"kernel_size must be ints, got \(2.5, 3\)",
    ),
    (
        "kernel_size-zero",
        lambda: gs.spatial_dependence(X, (0, 3)),
        ValueError,
        "kernel_size must be positive ints",
    ),
    (
        "measure",
        lambda: gs.spatial_dependence(X, (3, 3), measure="mi"),
        ValueError,
        "unknown measure 'mi'",
    ),
    (
        "dilation-float",
        lambda: gs.spatial_dependence(X, (3, 3), dilation=1.5),
        TypeError,
        "dilation must be ints",
    ),
    (
        "dilation-zero",
        lambda: gs.spatial_dependence(X, (3, 3), dilation=0),
        ValueError,
        "dilation must be >= 1",
    ),
    (
        "dilation-dims",
        lambda: gs.spatial_dependence(X, (3, 3), dilation=(1, 1, 1)),
        ValueError,
        "dilation .* does not match 2 spatial dims",
    ),
    (
        "padding-negative",
        lambda: gs.spatial_dependence(X, (3, 3), padding=-1),
        ValueError,
        "padding must be >= 0",
    ),
    (
        "padding-word",
        lambda: gs.spatial_dependence(X, (3, 3), padding="full"),
        ValueError,
        "padding must be an int, a tuple, 'same' or 'valid', got 'full'",
    ),
    (
        "padding-float",
        lambda: gs.spatial_dependence(X, (3, 3), padding=1.5),
        TypeError,
        "padding must be an int, a tuple",
    ),
    (
        "padding-pair",
        lambda: gs.spatial_dependence(X, (3, 3), padding=[(1, 1, 1), 1]),
        ValueError,
        "padding per dim must be an int or a pair",
    ),
    (
        "padding_mode",
        lambda: gs.spatial_dependence(X, (3, 3), padding=1, padding_mode="mirror"),
        ValueError,
        "unknown padding_mode 'mirror'",
    ),
    (
        "padding-reflect",
        lambda: gs.spatial_dependence(X, (3, 3), padding=6, padding_mode="reflect"),
        ValueError,
        r"reflect padding .* needs a larger map than \(6, 6\)",
    ),
    (
        "engine",
        lambda: gs.spatial_dependence(X, (3, 3), engine="gpu"),
        ValueError,
        "engine must be 'auto', 'compiled' or 'torch'",
    ),
    (
        "diag_removal",
        lambda: gs.spatial_dependence(X, (3, 3), diag_removal=1),
        TypeError,
        "diag_removal must be a bool",
    ),
    (
        "PairGeometry",
        lambda: PairGeometry.create((3, 3), padding=(1,)),
        ValueError,
        r"padding \(1,\) does not match 2 spatial dims",
    ),
    (
        "dependence_to_scaling-type",
        lambda: gs.dependence_to_scaling([[0.5, 1.0, 0.5]]),
        TypeError,
        "dependence_to_scaling: dependence must be a tensor, got list",
    ),
    (
        "dependence_to_scaling-shape",
        lambda: gs.dependence_to_scaling(torch.rand(3)),
        ValueError,
        r"dependence must have shape \(C, \*kernel\) with C >= 1, got \(3,\)",
    ),
    (
        "dependence_to_scaling-channels",
        lambda: gs.dependence_to_scaling(torch.rand(0, 3, 3)),
        ValueError,
        r"C >= 1, got \(0, 3, 3\)",
    ),
    (
        "dependence_to_scaling-range",
        lambda: gs.dependence_to_scaling(torch.full((2, 3, 3), -0.5), layer="conv1"),
        ValueError,
        r"dependence of 'conv1' must lie in \[0, 1\]",
    ),
    (
        "dependence_to_scaling-inf",
        lambda: gs.dependence_to_scaling(torch.full((2, 3, 3), math.inf)),
        ValueError,
        r"must lie in \[0, 1\]",
    ),
    (
        "dependence_to_scaling-floor",
        lambda: gs.dependence_to_scaling(torch.rand(2, 3, 3), floor=2.0),
        ValueError,
        r"dependence_to_scaling: floor must lie in \(0, 1\], got 2.0",
    ),
    (
        "dependence_to_scaling-floor-type",
        lambda: gs.dependence_to_scaling(torch.rand(2, 3, 3), floor="a"),
        TypeError,
        "dependence_to_scaling: floor must be a real number",
    ),
    (
        "dependence_to_scaling-k",
        lambda: gs.dependence_to_scaling(torch.rand(2, 3, 3), k=math.inf),
        ValueError,
        "k must be finite and > 0, got inf",
    ),
    (
        "k_transform-s",
        lambda: gs.k_transform(0.5, 5.0),
        TypeError,
        "k_transform: s must be a tensor",
    ),
    ("k_transform-k", lambda: gs.k_transform(torch.rand(3), True), TypeError, "k must be a real"),
    (
        "masks_to_scaling-empty",
        lambda: gs.masks_to_scaling([]),
        TypeError,
        "masks must be a non-empty sequence",
    ),
    (
        "masks_to_scaling-tensor",
        lambda: gs.masks_to_scaling(torch.ones(3, 3)),
        TypeError,
        "masks must be a non-empty sequence",
    ),
    (
        "masks_to_scaling-item",
        lambda: gs.masks_to_scaling([torch.ones(3, 3), "row"]),
        TypeError,
        r"masks\[1\] must be a tensor of 0s and 1s",
    ),
    (
        "masks_to_scaling-scalar",
        lambda: gs.masks_to_scaling([torch.tensor(1.0)]),
        ValueError,
        r"masks\[0\] is a scalar",
    ),
    (
        "masks_to_scaling-shape",
        lambda: gs.masks_to_scaling([torch.ones(3, 3), torch.ones(1, 3)]),
        ValueError,
        r"masks\[1\] has shape \(1, 3\), expected \(3, 3\)",
    ),
    (
        "masks_to_scaling-binary",
        lambda: gs.masks_to_scaling([torch.full((3, 3), 0.5)]),
        ValueError,
        r"masks\[0\] is not binary",
    ),
    (
        "masks_to_scaling-cover",
        lambda: gs.masks_to_scaling([torch.eye(3)]),
        ValueError,
        r"kernel positions \[\(0, 1\).* are covered by no branch",
    ),
    (
        "branch_scaling-kind",
        lambda: gs.branch_scaling("acnet"),
        ValueError,
        "unknown branch structure 'acnet'",
    ),
    (
        "branch_scaling-kind-type",
        lambda: gs.branch_scaling(["acb"]),
        TypeError,
        "branch_scaling: kind must be a string",
    ),
    (
        "branch_scaling-even",
        lambda: gs.branch_scaling("acb", 4),
        ValueError,
        r"kernel_size must be an odd int or a pair of odd ints .* got \(4, 4\)",
    ),
    (
        "branch_scaling-float",
        lambda: gs.branch_scaling("acb", 3.0),
        TypeError,
        "kernel_size must be an int or a pair of ints, got 3.0",
    ),
    (
        "branch_scaling-bool",
        lambda: gs.branch_scaling("acb", True),
        TypeError,
        "kernel_size must be an int or a pair of ints, got True",
    ),
    ("grid_scaling-alpha", lambda: gs.grid_scaling(0, 2), ValueError, "alpha must be finite"),
    ("grid_scaling-beta", lambda: gs.grid_scaling(2, "2"), TypeError, "beta must be a real number"),
    ("grid_scaling-inf", lambda: gs.grid_scaling(2, math.inf), ValueError, "beta must be finite"),
    (
        "RefreshSchedule-warmup",
        lambda: gs.RefreshSchedule(warmup=-1),
        ValueError,
        "RefreshSchedule.warmup must be an int >= 0, got -1",
    ),
    (
        "RefreshSchedule-every",
        lambda: gs.RefreshSchedule(every=2.0),
        ValueError,
        "RefreshSchedule.every must be an int >= 1, got 2.0",
    ),
    (
        "RefreshSchedule-batches",
        lambda: gs.RefreshSchedule(batches=True),
        ValueError,
        "RefreshSchedule.batches must be an int >= 1, got True",
    ),
    (
        "RefreshSchedule.due",
        lambda: gs.RefreshSchedule().due("3"),
        TypeError,
        "RefreshSchedule.due: epoch must be an int, got str",
    ),
    ("compose-empty", lambda: gs.compose(), ValueError, "compose: give at least one transform"),
    ("compose-type", lambda: gs.compose(model()), TypeError, "Sequential is not a gradshape"),
    (
        "eligible_convs",
        lambda: gs.eligible_convs("net"),
        TypeError,
        "model must be a torch.nn.Module, got str",
    ),
]


@pytest.mark.parametrize("call,error,pattern", [pytest.param(*r[1:], id=r[0]) for r in FUNCTIONS])
def test_function_arguments(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


def test_compose_rejects_duplicates_and_composed_state_is_checked():
    first = gs.SpatialGradientScaling(model())
    with pytest.raises(ValueError, match="compose: the same transform is listed twice"):
        gs.compose(first, first)
    both = gs.compose(first)
    with pytest.raises(ValueError, match=r"Composed.load_state_dict: expected keys \['0'\]"):
        both.load_state_dict({"1": {}})
    with pytest.raises(TypeError, match="Composed.load_state_dict expects a mapping"):
        both.load_state_dict([{}])
    both.remove()


def test_epochs_may_be_numpy_integers():
    # Harnesses often count epochs with numpy; those are valid ints.
    np = pytest.importorskip("numpy")
    transform = gs.SpatialGradientScaling(model(), seed=np.int64(3))
    assert transform.maybe_refresh(np.int64(1), [images()])
    assert transform.last_refresh_epoch == 1
    transform.remove()
