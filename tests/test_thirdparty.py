"""SGS, CDG and the reparameterizations on third-party model code (issues 15 and 20).

The architectures (tests/thirdparty_models.py) are built from Hugging Face ``transformers``
and MONAI config classes with tiny sizes; nothing is downloaded.  For each one:

* selection: the layers scaled and the reasons for the ones skipped, against the convs of each
  kind the architecture has (counted by hand in thirdparty_models.py);
* scalings: G is finite, positive, mean 1 over the live taps and equal to an independent
  recomputation from what each convolution *operation* convolves.  A ``TorchFunctionMode``
  records the ``(input, weight, padding, dilation)`` of every conv1d/2d/3d call during an
  eval-mode no-grad forward of a fresh copy of the model; each call belongs to the module
  whose weight Parameter it receives or, for a derived weight (weight standardisation, weight
  norm), to the innermost conv module executing.  Expected G: ``spatial_dependence`` of the
  recorded inputs with the recorded padding and dilation, then ``dependence_to_scaling(k=5)``
  on the live taps (see :func:`expected_scaling` for dead taps and masks);
* gradients: ∂L/∂W with SGS attached (state loaded from a state_dict saved to bytes) equals
  G ⊙ the plain ∂L/∂W; mode="update" with Adam scales Adam's step by G;
* CDG: attaches to every trainable conv and its gradient solves (I − Δ) g̃ = g;
* convert/fuse (2-D models), "acb", "repvgg", "dbb": same eval-mode output before converting,
  after converting and after fusing, and the blocks expose the conv attributes.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode

import gradshape as gs

os.environ["HF_HUB_OFFLINE"] = "1"  # never reach a hub, even by accident
pytest.importorskip("transformers")
pytest.importorskip("monai")

import thirdparty_models as tm  # needs transformers and monai: imported after the skips

K = 5.0
CASES = tm.cases()
CASE_IDS = [c.name for c in CASES]
BY_NAME = {c.name: c for c in CASES}

#: Words a skip reason of each kind must contain (any one of them).
REASON_WORDS = {
    "1x1": ("(1,", "1x1", "1×1"),
    "transposed": ("transpos",),
    "frozen": ("requires_grad", "frozen"),
    "even": ("even",),
    "patchify": ("patchify",),
    "even+patchify": ("even", "patchify"),
}


# ---- what the architecture has -------------------------------------------------------------


def conv_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)}


def conv_kind(module: nn.Module) -> str:
    """The kind of a conv (see thirdparty_models), from its attributes."""
    if module.transposed:
        return "transposed"
    kernel, stride = tuple(module.kernel_size), tuple(module.stride)
    if all(k == 1 for k in kernel):
        return "1x1"
    if not module.weight.requires_grad:
        return "frozen"
    even = any(k % 2 == 0 for k in kernel)
    patch = all(s >= k for s, k in zip(stride, kernel, strict=True))
    if even and patch:
        return "even+patchify"
    return "even" if even else "patchify" if patch else "scaled"


def scaled_under(kind: str, options: Mapping[str, bool]) -> bool:
    even, patch = options.get("even_kernels", False), options.get("patchify", False)
    return (
        kind == "scaled"
        or (kind == "even" and even)
        or (kind == "patchify" and patch)
        or (kind == "even+patchify" and even and patch)
    )


def forward(model: nn.Module, batch: Any) -> torch.Tensor:
    out = model(**batch) if isinstance(batch, Mapping) else model(batch)
    return out if isinstance(out, torch.Tensor) else out[0]


# ---- capture of every conv operation ------------------------------------------------------

_CONV_FUNCS = {torch.conv1d, torch.conv2d, torch.conv3d, F.conv1d, F.conv2d, F.conv3d}
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


@dataclass
class ConvOp:
    input: torch.Tensor
    kernel: tuple[int, ...]
    padding: Any
    dilation: tuple[int, ...]


class ConvOpCapture(TorchFunctionMode):
    """Records each conv1d/2d/3d call of a forward, by the conv module it belongs to."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.convs = conv_modules(model)
        self.owner = {
            id(m._parameters["weight"]): n
            for n, m in self.convs.items()
            if m._parameters.get("weight") is not None
        }
        self.executing: list[str] = []
        self.ops: dict[str, list[ConvOp]] = {}
        self.orphans = 0
        self._handles: list[Any] = []

    def __enter__(self):
        for name, m in self.convs.items():
            self._handles.append(m.register_forward_pre_hook(self._enter(name)))
            self._handles.append(m.register_forward_hook(self._leave))
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        return super().__exit__(*exc)

    def _enter(self, name: str):
        def hook(_module, _args):
            self.executing.append(name)

        return hook

    def _leave(self, _module, _args, _out):
        self.executing.pop()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _CONV_FUNCS:
            call = dict(zip(_CONV_ARGS, args, strict=False)) | kwargs
            x, w = call["input"], call["weight"]
            dims = w.dim() - 2
            dilation = call.get("dilation", 1)
            dilation = (dilation,) * dims if isinstance(dilation, int) else tuple(dilation)
            op = ConvOp(x.detach().clone(), tuple(w.shape[2:]), call.get("padding", 0), dilation)
            name = self.owner.get(id(w)) or (self.executing[-1] if self.executing else None)
            if name is None:
                self.orphans += 1
            else:
                self.ops.setdefault(name, []).append(op)
        return func(*args, **kwargs)


def capture(model: nn.Module, batch: Any) -> dict[str, list[ConvOp]]:
    model.eval()
    with torch.no_grad(), ConvOpCapture(model) as cap:
        forward(model, batch)
    assert cap.orphans == 0, "a conv op that belongs to no conv module"
    return cap.ops


# ---- the expected scaling -------------------------------------------------------------------


def live_box(kernel, dilation, sizes) -> tuple[slice, ...]:
    """Kernel positions with a pixel-pixel pair inside an unpadded map of ``sizes``.

    Position i of a dim is live iff |(i − k//2)·d| < size: the live taps form a box.
    """
    box = []
    for k, d, n in zip(kernel, dilation, sizes, strict=True):
        idx = [i for i in range(k) if abs((i - k // 2) * d) < n]
        assert (k // 2 - idx[0]) == (idx[-1] - idx[0] + 1) // 2, "the live box is off-centre"
        box.append(slice(idx[0], idx[-1] + 1))
    return tuple(box)


def _masked_maps(op: ConvOp, lengths: list[int]) -> list[torch.Tensor]:
    """Each example as if it had been given alone: its valid prefix, padded as the conv pads
    it at both of its own ends."""
    x = op.input
    pad = op.padding if isinstance(op.padding, int) else op.padding[0]
    return [F.pad(x[n : n + 1, :, :length], (pad, pad)) for n, length in enumerate(lengths)]


def expected_scaling(ops: list[ConvOp], lengths: list[int] | None = None):
    """G from the definition, and the boolean map of live taps.

    Live taps (:func:`live_box` on the largest unpadded input, or on the longest valid length
    when a mask applies) get ``dependence_to_scaling`` of their own dependences, so their mean
    is 1; dead taps get 1; a layer with no live off-centre tap gets all ones.  With a mask,
    each example's valid prefix is measured on its own, as if unpadded (the conv's own padding
    at both of its ends, pairs reaching further into the masked region dropped), and the pairs
    of all examples are pooled.
    """
    kernel, dilation, padding = ops[0].kernel, ops[0].dilation, ops[0].padding
    assert all((o.kernel, o.dilation, o.padding) == (kernel, dilation, padding) for o in ops)
    if lengths is None:
        sizes = [max(o.input.shape[2 + i] for o in ops) for i in range(len(kernel))]
    else:
        sizes = [max(lengths)]
    box = live_box(kernel, dilation, sizes)
    live = torch.zeros(kernel, dtype=torch.bool)
    live[box] = True
    g = torch.ones(kernel, dtype=torch.float64)
    if int(live.sum()) == 1:
        return g, live
    if lengths is None:
        s = gs.spatial_dependence(
            [o.input for o in ops], kernel, padding=padding, dilation=dilation
        )
    else:
        assert len(ops) == 1
        maps = _masked_maps(ops[0], lengths)
        s = gs.spatial_dependence(maps, kernel, padding=0, dilation=dilation)
    g[box] = gs.dependence_to_scaling(s[(slice(None), *box)], K)
    return g, live


def names_in_warnings(caught, names) -> set[str]:
    texts = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    return {
        n for n in names if any(re.search(rf"(?<![\w.]){re.escape(n)}(?![\w.])", t) for t in texts)
    }


# ---- one refresh per architecture, shared by the tests ------------------------------------


@dataclass
class Refreshed:
    scaled: set[str]
    scalings: dict[str, torch.Tensor]
    unmeasured: dict[str, str]
    state: dict[str, Any]
    warned: list[warnings.WarningMessage]
    ops: dict[str, list[ConvOp]]


_REFRESHED: dict[str, Refreshed] = {}


def refreshed(case: tm.Case) -> Refreshed:
    if case.name not in _REFRESHED:
        model = case.build()
        sgs = gs.SpatialGradientScaling(model, k=K, **case.options)
        batch = case.batch()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sgs.refresh([batch])
        _REFRESHED[case.name] = Refreshed(
            set(sgs.modules),
            sgs.scalings,
            dict(sgs.unmeasured),
            sgs.state_dict(),
            list(caught),
            capture(case.build(), batch),
        )
    return _REFRESHED[case.name]


def through_bytes(state: dict[str, Any]) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# ---- gradients ----------------------------------------------------------------------------


def gradients(model: nn.Module, case: tm.Case):
    """∂L/∂p for every parameter (by name) and, for parametrized convs, ∂L/∂W of the
    effective weight.  L = Σ R ⊙ output with a fixed random R."""
    model.train(case.grad_in_train_mode)
    model.zero_grad(set_to_none=True)
    effective = {}
    with parametrize.cached():
        for name, m in conv_modules(model).items():
            if parametrize.is_parametrized(m, "weight"):
                effective[name] = m.weight
                effective[name].retain_grad()
        out = forward(model, case.batch())
        gen = torch.Generator().manual_seed(99)
        weights = torch.randn(out.shape, generator=gen, dtype=out.dtype)
        (out * weights).sum().backward()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    return grads, {n: w.grad.clone() for n, w in effective.items()}


def weight_names(model: nn.Module) -> dict[str, str]:
    """Parameter name of each plain conv weight -> conv module name."""
    out = {}
    for name, m in conv_modules(model).items():
        if not parametrize.is_parametrized(m, "weight"):
            out[f"{name}.weight" if name else "weight"] = name
    return out


def broadcast(g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return g.to(like.dtype).reshape((1, 1, *g.shape))


# ---- tests: selection ---------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_selection_and_skip_reasons_follow_the_architecture(case):
    """Scaled: exactly the convs of kind "scaled" (plus the opted-in kinds); every other conv
    is in ``skipped`` with a reason that names its kind."""
    model = case.build()
    convs = conv_modules(model)
    kinds = {n: conv_kind(m) for n, m in convs.items()}
    assert Counter(kinds.values()) == Counter(case.counts)
    sgs = gs.SpatialGradientScaling(model, **case.options)
    scaled = {n for n, k in kinds.items() if scaled_under(k, case.options)}
    assert set(sgs.modules) == scaled
    assert set(sgs.skipped) == set(convs) - scaled
    for name, reason in sgs.skipped.items():
        words = REASON_WORDS[kinds[name]]
        assert any(w in reason.lower() for w in words), (name, kinds[name], reason)
    sgs.remove()
    if case.options:  # without the opt-ins those layers are skipped, with the option named
        opted = {n for n in scaled if kinds[n] != "scaled"}
        if opted == scaled:
            with pytest.raises(ValueError):
                gs.SpatialGradientScaling(model)
        else:
            plain = gs.SpatialGradientScaling(model)
            assert set(plain.modules) == scaled - opted
            for name in opted:
                assert any(w in plain.skipped[name].lower() for w in REASON_WORDS[kinds[name]])
            plain.remove()


def hook_state(model: nn.Module) -> tuple:
    """What an attached transform would change: tensor hooks and parametrizations."""
    return (
        [bool(p._backward_hooks) for p in model.parameters()],
        [len(m.parametrizations.weight) for m in model.modules() if parametrize.is_parametrized(m)],
    )


@pytest.mark.parametrize("name", ["hf-vit-patch3", "hf-swin-patch4"])
def test_patch_embedding_models_refuse_by_default_and_stay_untouched(name):
    """Their only conv is a patch embedding: by default there is nothing to scale, the error
    says why (and the failed constructor leaves no hook); the opt-ins scale it."""
    case = BY_NAME[name]
    model = case.build()
    (kind,) = {conv_kind(m) for m in conv_modules(model).values()}
    before = hook_state(model)
    with pytest.raises(ValueError) as err:
        gs.SpatialGradientScaling(model)
    assert any(w in str(err.value).lower() for w in REASON_WORDS[kind])
    assert hook_state(model) == before
    sgs = gs.SpatialGradientScaling(model, **case.options)
    assert set(sgs.modules) == {"embeddings.patch_embeddings.projection"}


def test_no_eligible_conv_error_counts_convs_by_kind():
    """A ConvNeXt whose depthwise convs are frozen has 6 convs and none eligible: 3 frozen,
    3 even patchify convs.  The headline counts them and says why each kind was skipped."""
    model = tm.convnext().build()
    for name, m in conv_modules(model).items():
        if name.endswith("dwconv"):
            m.weight.requires_grad_(False)
    before = hook_state(model)
    with pytest.raises(ValueError) as err:
        gs.SpatialGradientScaling(model)
    message = str(err.value)
    assert "6" in message.splitlines()[0]
    assert "3" in message
    low = message.lower()
    assert any(w in low for w in REASON_WORDS["frozen"])
    assert any(w in low for w in REASON_WORDS["even+patchify"])
    assert hook_state(model) == before


# ---- tests: scalings ----------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_scalings_come_from_what_each_conv_op_convolves(case):
    """Each scaled layer's G after one refresh: finite, positive, mean 1 over its live taps, 1
    on dead taps, equal to :func:`expected_scaling` of the conv ops recorded for it.  Layers no
    eval forward reaches are ``unmeasured``, keep G = 1 and are named in a warning; so are
    layers without a live off-centre tap."""
    r = refreshed(case)
    model = case.build()
    convs = conv_modules(model)
    lengths = case.valid_lengths or {}
    reached = set(r.ops)
    assert set(r.unmeasured) == r.scaled - reached
    assert all(reason for reason in r.unmeasured.values())
    assert names_in_warnings(r.warned, r.unmeasured) == set(r.unmeasured)
    all_dead = set()
    for name in sorted(r.scaled):
        g = r.scalings[name]
        assert tuple(g.shape) == tuple(convs[name].kernel_size), name
        assert bool(torch.isfinite(g).all()) and bool((g > 0).all()), name
        if name in r.unmeasured:
            assert torch.equal(g, torch.ones_like(g)), name  # first refresh: G stays 1
            continue
        expected, live = expected_scaling(r.ops[name], lengths.get(name))
        if int(live.sum()) == 1:
            all_dead.add(name)
        torch.testing.assert_close(
            g.double()[live].mean(), torch.tensor(1.0, dtype=torch.float64), rtol=0, atol=1e-5
        )
        assert bool((g[~live] == 1).all()), name
        torch.testing.assert_close(g.double(), expected, rtol=1e-5, atol=1e-6, msg=name)
    assert all_dead == set(case.dead)
    assert names_in_warnings(r.warned, all_dead) == all_dead


def test_wav2vec2_scalings_do_not_depend_on_how_the_clips_are_padded():
    """The same clips padded to the longest one and to three times that length: every conv the
    mask reaches (the feature encoder's and the positional conv, which pads itself) gets the
    same G; without the mask they would not (the recomputation below shows the gap)."""
    case = BY_NAME["hf-wav2vec2"]
    short, long = tm.audio_batch(max(tm.W2V_LENGTHS)), tm.audio_batch(3 * max(tm.W2V_LENGTHS))
    encoder = sorted(refreshed(case).scaled)
    assert any(n.startswith("encoder.pos_conv_embed") for n in encoder)
    scalings = []
    for batch in (short, long):
        model = case.build()
        sgs = gs.SpatialGradientScaling(model, k=K)
        sgs.refresh([batch])
        scalings.append(sgs.scalings)
    for name in encoder:
        torch.testing.assert_close(scalings[1][name], scalings[0][name], rtol=0, atol=1e-6)
    ops = capture(case.build(), long)
    name = "feature_extractor.conv_layers.0.conv"
    unmasked, _ = expected_scaling(ops[name])
    masked, _ = expected_scaling(ops[name], case.valid_lengths[name])
    assert float((unmasked - masked).abs().max()) > 0.05


def test_unreached_conv_keeps_its_last_scaling():
    """``aux`` runs only in training: a refresh warns, lists it in ``unmeasured`` and leaves its
    G as it was; ``mix`` is measured where its weight reaches F.conv1d."""
    case = BY_NAME["issue20-hidden-convs"]
    model = case.build()
    sgs = gs.SpatialGradientScaling(model, k=K)
    previous = torch.linspace(0.5, 1.5, 25).reshape(5, 5)
    state = sgs.state_dict()
    state["scalings"]["aux"] = previous
    sgs.load_state_dict(state)
    with pytest.warns(RuntimeWarning, match="aux"):
        sgs.refresh([case.batch()])
    assert set(sgs.unmeasured) == {"aux"}
    torch.testing.assert_close(sgs.scalings["aux"], previous.float(), rtol=0, atol=0)
    expected, _ = expected_scaling(capture(case.build(), case.batch())["mix"])
    torch.testing.assert_close(sgs.scalings["mix"].double(), expected, rtol=1e-5, atol=1e-6)


# ---- tests: gradients, optimizer steps, state -----------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_gradients_are_the_scaling_times_the_plain_gradients(case):
    r = refreshed(case)
    plain_model = case.build()
    plain, plain_effective = gradients(plain_model, case)
    model = case.build()
    sgs = gs.SpatialGradientScaling(model, k=K, **case.options)
    sgs.load_state_dict(through_bytes(r.state))  # the state round trip
    for name, g in r.scalings.items():
        torch.testing.assert_close(sgs.scalings[name], g, rtol=0, atol=0)
    scaled, _ = gradients(model, case)
    weights = weight_names(model)
    assert set(scaled) == set(plain)
    parametrized = {f"{n}.parametrizations.weight." for n in plain_effective if n in r.scaled}
    for pname, grad in scaled.items():
        if any(pname.startswith(prefix) for prefix in parametrized):
            continue  # checked below, through the parametrization
        base = plain[pname]
        if grad is None or base is None:
            assert grad is None and base is None, pname
            continue
        module = weights.get(pname)
        expected = base * broadcast(r.scalings[module], base) if module in r.scaled else base
        scale = float(base.abs().max()) + 1e-30
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6 * scale, msg=pname)
    # a parametrized weight: G scales ∂L/∂W of the effective W, which then flows through the
    # parametrization to its own tensors
    for name, dw in plain_effective.items():
        if name not in r.scaled:
            continue
        chain = conv_modules(plain_model)[name].parametrizations.weight
        originals = [p for n, p in chain.named_parameters() if n.startswith("original")]
        pulled = torch.autograd.grad(chain(), originals, dw * broadcast(r.scalings[name], dw))
        names = [f"{name}.parametrizations.weight.{n}" for n, _ in chain.named_parameters()]
        for pname, want in zip(names, pulled, strict=True):
            scale = float(want.abs().max()) + 1e-30
            torch.testing.assert_close(scaled[pname], want, rtol=1e-5, atol=1e-6 * scale)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_update_mode_scales_adams_step(case):
    """mode="update": Adam's step Δw on a scaled (plain) weight becomes G ⊙ Δw."""
    r = refreshed(case)
    lr = 1e-2
    reference, model = case.build(), case.build()
    ref_opt = torch.optim.Adam(reference.parameters(), lr=lr)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sgs = gs.SpatialGradientScaling(model, k=K, mode="update", optimizer=opt, **case.options)
    weights = weight_names(model)
    assert set(sgs.modules) == r.scaled & set(weights.values())
    for name in sgs.modules:
        sgs.set_scaling(name, r.scalings[name])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for net, optimizer in ((reference, ref_opt), (model, opt)):
        gradients(net, case)
        optimizer.step()
    ref_params = dict(reference.named_parameters())
    for pname, p in model.named_parameters():
        step, ref_step = p.detach() - before[pname], ref_params[pname].detach() - before[pname]
        module = weights.get(pname)
        if module in sgs.modules:
            ref_step = ref_step * broadcast(r.scalings[module], ref_step)
        torch.testing.assert_close(step, ref_step, rtol=1e-4, atol=1e-6, msg=pname)


# ---- tests: CDG ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_channel_directed_gradients_solve_the_sobolev_system(case):
    """Default CDG (a = 1, λ = 1) acts on every trainable conv with a plain weight, 1x1 and
    transposed included, and its gradient g̃ satisfies g̃ − λ·Δg̃ = g along the output
    channels (periodic second difference Δ; dim 1 of a transposed conv's weight)."""
    plain, _ = gradients(case.build(), case)
    model = case.build()
    convs = conv_modules(model)
    trainable = {
        n
        for n, m in convs.items()
        if not parametrize.is_parametrized(m, "weight") and m.weight.requires_grad
    }
    cdg = gs.ChannelDirectedGradients(model)
    assert set(cdg.modules) == trainable
    assert set(cdg.skipped) >= set(convs) - trainable
    directed, _ = gradients(model, case)
    weights = weight_names(model)
    for pname, g in directed.items():
        base = plain[pname]
        if pname not in weights or weights[pname] not in trainable or base is None:
            if base is None:
                assert g is None, pname
            else:
                torch.testing.assert_close(g, base, rtol=0, atol=0, msg=pname)
            continue
        axis = 1 if convs[weights[pname]].transposed else 0
        g64 = g.double()
        second = g64.roll(1, axis) + g64.roll(-1, axis) - 2 * g64
        scale = float(base.abs().max()) + 1e-30
        torch.testing.assert_close(
            g64 - second, base.double(), rtol=1e-4, atol=1e-5 * scale, msg=pname
        )


# ---- tests: structural reparameterization ---------------------------------------------------

CONVERT_CASES = [c for c in CASES if not c.name.startswith(("monai", "hf-wav2vec2"))]


def _plain_forward(module: nn.Module) -> bool:
    return all(
        getattr(type(module), m) is getattr(nn.Conv2d, m) for m in ("forward", "_conv_forward")
    )


def followed_by_batchnorm(model: nn.Module, batch: Any) -> set[str]:
    """Convs whose output tensor is the input of a BatchNorm2d, observed in one forward."""
    outputs: dict[int, str] = {}
    pairs = set()
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            handles.append(
                m.register_forward_hook(lambda _m, _a, out, n=name: outputs.__setitem__(id(out), n))
            )
        elif isinstance(m, nn.BatchNorm2d):

            def seen(_m, args):
                if id(args[0]) in outputs:
                    pairs.add(outputs[id(args[0])])

            handles.append(m.register_forward_pre_hook(seen))
    try:
        model.eval()
        with torch.no_grad():
            forward(model, batch)
    finally:
        for h in handles:
            h.remove()
    return pairs


def numeric_padding(conv: nn.Conv2d) -> tuple[int, ...]:
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        return tuple(d * (k - 1) // 2 for k, d in zip(conv.kernel_size, conv.dilation, strict=True))
    return tuple(conv.padding)


def _has_batchnorm(case: tm.Case) -> bool:
    return any(isinstance(m, nn.BatchNorm2d) for m in case.build().modules())


def _conversions() -> list[Any]:
    """Per branch with ``case.per_branch_kinds`` on the models with BatchNorm, after the sum
    with each kind on the others; on the BatchNorm models after the sum with one kind each,
    taking turns."""
    kinds = ("acb", "repvgg", "dbb")
    params, turn = [], 0
    for case in CONVERT_CASES:
        if _has_batchnorm(case):
            runs = [("per_branch", k) for k in case.per_branch_kinds]
            runs.append(("after_sum", kinds[turn % 3]))
            turn += 1
        else:
            runs = [("after_sum", k) for k in kinds]
        params += [pytest.param(case, bn, k, id=f"{case.name}-{bn}-{k}") for bn, k in runs]
    return params


CONVERSIONS = _conversions()


@pytest.mark.parametrize("case, bn, kind", CONVERSIONS)
def test_convert_and_fuse_keep_the_eval_output(case, bn, kind):
    """Every plain odd Conv2d (kernel > 1, dilation 1) becomes a block: after the sum always;
    per branch only where a BatchNorm2d takes its output (seen in one forward), and a conv
    left alone there never gets the false reason that no BatchNorm follows it.  The blocks
    answer the conv attributes model code reads; converted and fused models compute the
    original eval-mode output."""
    model = case.build()
    batch = case.batch()
    convs = conv_modules(model)
    frozen = {n for n, m in convs.items() if not m.weight.requires_grad}
    convertible = {
        n
        for n, m in convs.items()
        if isinstance(m, nn.Conv2d)
        and _plain_forward(m)
        and all(k % 2 == 1 for k in m.kernel_size)
        and any(k > 1 for k in m.kernel_size)
        and all(d == 1 for d in m.dilation)
    } - frozen
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        conversion = gs.reparam.convert(model, kind, bn=bn)
    converted = set(conversion.converted) - frozen
    if bn == "after_sum":
        assert converted == convertible
    else:
        with_bn = convertible & followed_by_batchnorm(model, batch)
        assert converted <= with_bn
        reasons = dict(conversion.skipped)
        for name in with_bn - converted:
            assert "no batchnorm2d directly follows" not in reasons[name].lower(), name
    blocks = dict(conversion.model.named_modules())
    for name in conversion.converted:
        block, conv = blocks[name], convs[name]
        for attr in ("in_channels", "out_channels", "kernel_size", "stride", "dilation", "groups"):
            got, want = getattr(block, attr), getattr(conv, attr)
            assert (tuple(got) if isinstance(want, tuple) else got) == want, (name, attr)
        assert block.padding in (conv.padding, numeric_padding(conv)), name
        assert block.padding_mode == conv.padding_mode, name
        assert tuple(block.weight.shape) == tuple(conv.weight.shape), name
        assert hasattr(block, "bias"), name
    fused = gs.reparam.fuse(conversion.model)
    with torch.no_grad():
        model.eval()
        conversion.model.eval()
        fused.eval()
        original = forward(model, batch)
        outputs = {"converted": forward(conversion.model, batch), "fused": forward(fused, batch)}
    tol = 1e-4 * (1.0 + float(original.abs().max()))
    for label, out in outputs.items():
        assert float((out - original).abs().max()) <= tol, label
