"""RepOptimizers: a structure's training dynamics as constant per-channel gradient multipliers.

Ding et al., "Re-parameterizing Your Optimizers rather than Architectures", ICLR 2023 (facts
and formulas as in ``/shared/specs/repopt.md``).

* :class:`CSLABlock`: the hyper-search block ``y = s⊙(x∗W₃) + t⊙(x∗W₁) + u⊙x`` with
  per-output-channel scales ``s``, ``t``, ``u``; the conv's BatchNorm stays after the sum.
* :func:`convert_csla`: a model's convs → CSLA blocks (the hyper-search model),
  :func:`fuse_csla` back;
  :func:`csla_scales` / :func:`load_csla_scales`: its scales by module name, strictly.
* :func:`repopt_scalings`: the multipliers ``M`` (full weight shape) for SGD or AdamW;
  :func:`repopt_reinit`: the target model's initial kernels from the scales;
  :func:`attach_repopt`: ``M`` on a plain model through
  :class:`~gradshape.SpatialGradientScaling` (and, for AdamW, :class:`DecoupledStepScaling`).

Why it is exact for SGD (the Lemma-1 analogue).  With ``G = ∂L/∂W'`` for the merged kernel
``W' = s⊙W₃ + t⊙pad(W₁) + u·δ(o = i, centre)``, the branch gradients are ``s⊙G``, ``t⊙G_c``
and ``G_{oo,c}``, so one SGD step on the branches moves ``W'`` by ``−lr·M⊙G`` with

    M[o, i, p, q] = s_o² + t_o²·[centre] + [o = i]·[centre].

Momentum, Nesterov, dampening and coupled weight decay are linear and act per branch, and the
branches' decays sum to ``wd·W'``: plain SGD on ``W'`` with ``.grad ← M⊙.grad`` follows the
same merged kernels exactly (``tests/test_repopt.py``: ≤ 1e-10 relative after 50 steps in
float64).  Gradient clipping breaks it (the branch norms differ from the merged one).
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..selection import LayerSelector, layer_predicate
from ..spatial import SpatialGradientScaling
from ..transform import Composed, ParameterTransform, compose
from .blocks import ReparamBlock, conv_from_kernel, conversion_obstacle
from .convert import Conversion, selected_convs
from .fusion import identity_kernel, pad_to_kernel

__all__ = [
    "REPOPT_OPTIMIZERS",
    "CSLABlock",
    "DecoupledStepScaling",
    "attach_repopt",
    "convert_csla",
    "csla_scales",
    "fuse_csla",
    "load_csla_scales",
    "repopt_reinit",
    "repopt_scalings",
]

#: The optimizers RepOptimizers' multipliers are derived for.
REPOPT_OPTIMIZERS = ("sgd", "adamw")


class CSLABlock(nn.Module):
    r"""The Constant-Scale Linear Addition block of RepOptimizers' hyper-search (Ding et al.,
    ICLR 2023, Sec. 3).

    ``y = s⊙(x∗W₃) + t⊙(x∗W₁) + u⊙x (+ b)`` with ``W₃`` K×K (padding ``K // 2``), ``W₁`` 1×1,
    the same stride and groups, and per-output-channel scales ``s``, ``t``, ``u`` (shape
    ``(out_channels,)``).  The identity term exists only where it aligns (``in_channels ==
    out_channels`` and stride 1).  One BatchNorm after the sum (the model's own, after the
    block) completes the paper's block.

    Args:
        in_channels, out_channels, kernel_size, stride, groups, padding_mode: the conv's
            geometry (odd kernel; padding is ``K // 2``).
        bias: an unscaled bias after the sum.
        identity: ``None``: the identity term where it aligns; ``False``: never.
        trainable_scales: ``s`` and ``t`` learn (the hyper-search) or stay constants
            (``requires_grad=False``).  ``u`` always learns (in the target it is the trainable
            diagonal of the merged kernel).

    Initialisation: ``W₃``, ``W₁`` and the bias as PyTorch's ``Conv2d``; ``s = t = u = 1``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int] = 3,
        stride: int | Sequence[int] = 1,
        groups: int = 1,
        bias: bool = False,
        padding_mode: str = "zeros",
        *,
        identity: bool | None = None,
        trainable_scales: bool = True,
    ) -> None:
        super().__init__()
        kernel = _pair(kernel_size, "kernel_size")
        stride = _pair(stride, "stride")
        if any(k < 1 or k % 2 == 0 for k in kernel) or any(s < 1 for s in stride):
            raise ValueError(f"CSLABlock: kernel_size must be odd and stride >= 1, got "
                             f"{kernel}, {stride}")  # fmt: skip
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(
                f"CSLABlock: in_channels ({in_channels}) and out_channels ({out_channels}) "
                f"must be divisible by groups ({groups})"
            )
        if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise ValueError(f"CSLABlock: unknown padding_mode {padding_mode!r}")
        aligned = in_channels == out_channels and stride == (1, 1)
        if identity and not aligned:
            raise ValueError(
                "CSLABlock: the identity term needs in_channels == out_channels and stride 1"
            )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.groups = kernel, stride, groups
        self.padding = (kernel[0] // 2, kernel[1] // 2)
        self.dilation = (1, 1)  # as the conv it stands in for (read by conv_from_kernel)
        self.padding_mode = padding_mode
        main = nn.Conv2d(in_channels, out_channels, kernel, stride, groups=groups, bias=bias)
        side = nn.Conv2d(in_channels, out_channels, 1, stride, groups=groups, bias=False)
        self.weight = main.weight
        self.weight_1x1 = side.weight
        self.bias = main.bias
        self.s = nn.Parameter(torch.ones(out_channels), requires_grad=trainable_scales)
        self.t = nn.Parameter(torch.ones(out_channels), requires_grad=trainable_scales)
        self.u = nn.Parameter(torch.ones(out_channels)) if aligned and identity is not False \
            else None  # fmt: skip

    @property
    def has_identity(self) -> bool:
        return self.u is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ph, pw = self.padding
        if self.padding_mode == "zeros":
            big = F.conv2d(x, self.weight, None, self.stride, self.padding, groups=self.groups)
        else:
            padded = F.pad(x, (pw, pw, ph, ph), mode=self.padding_mode)
            big = F.conv2d(padded, self.weight, None, self.stride, groups=self.groups)
        small = F.conv2d(x, self.weight_1x1, None, self.stride, groups=self.groups)
        y = big * self.s.reshape(1, -1, 1, 1) + small * self.t.reshape(1, -1, 1, 1)
        if self.u is not None:
            y = y + x * self.u.reshape(1, -1, 1, 1)
        if self.bias is not None:
            y = y + self.bias.reshape(1, -1, 1, 1)
        return y

    def merged_kernel(self) -> torch.Tensor:
        """``W' = s⊙W₃ + t⊙pad(W₁) + u·δ(o = i, centre)``, shape ``(out, in/groups, *K)``;
        differentiable."""
        kernel = self.weight * self.s.reshape(-1, 1, 1, 1)
        kernel = kernel + pad_to_kernel(self.weight_1x1, self.kernel_size) * self.t.reshape(
            -1, 1, 1, 1
        )
        if self.u is not None:
            eye = identity_kernel(
                self.out_channels,
                self.groups,
                self.kernel_size,
                dtype=self.weight.dtype,
                device=self.weight.device,
            )
            kernel = kernel + eye * self.u.reshape(-1, 1, 1, 1)
        return kernel

    def fused(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` computing the same function (:meth:`merged_kernel`)."""
        with torch.no_grad():
            kernel = self.merged_kernel()
        return conv_from_kernel(self, kernel, self.bias)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, groups={self.groups}, identity={self.has_identity}"
        )


def _pair(value: int | Sequence[int], label: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, Sequence) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (int(value[0]), int(value[1]))
    raise TypeError(f"CSLABlock: {label} must be an int or a pair of ints, got {value!r}")


def _csla_obstacle(conv: nn.Module) -> str:
    reason = conversion_obstacle(conv)
    if reason:
        return reason
    kh, kw = conv.kernel_size
    padding = conv.padding
    if padding == "same":
        padding = (kh // 2, kw // 2)
    if padding == "valid" or tuple(padding) != (kh // 2, kw // 2):
        return f"padding {padding!r} is not K // 2: the 1×1 and identity terms would not align"
    return ""


def convert_csla(
    model: nn.Module,
    *,
    scale_init: str = "stage",
    inplace: bool = False,
    include: LayerSelector = None,
    exclude: LayerSelector = None,
) -> Conversion:
    """The hyper-search model: every eligible ``nn.Conv2d`` → a :class:`CSLABlock` with
    trainable scales.

    Eligible: a plain ``nn.Conv2d`` with an odd kernel larger than 1×1, dilation 1 and padding
    ``K // 2``, used under one name and not inside another block.  ``W₃`` (and the bias) are
    copied from the conv, ``W₁`` is PyTorch's default (from the global RNG); a BatchNorm after
    the conv stays after the block.

    ``scale_init``: ``"stage"`` (RepOpt-VGG's rule, ``u = 1``): in ``named_modules`` order a
    block without an identity term starts a stage with ``s = t = 1``, and the l-th block with
    an identity after it gets ``s = t = √(2/l)``; ``"ones"``: every scale 1.

    Returns ``Conversion(model, converted, skipped)`` as :func:`~gradshape.reparam.convert`
    does; unless ``inplace`` a deep copy is converted.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert_csla: model must be an nn.Module, got {type(model).__name__}")
    if scale_init not in ("stage", "ones"):
        raise ValueError(f"convert_csla: scale_init must be 'stage' or 'ones', got {scale_init!r}")
    inc, exc = layer_predicate(include, "include"), layer_predicate(exclude, "exclude")
    work = model if inplace else copy.deepcopy(model)
    modules = dict(work.named_modules())
    uses = Counter(id(m) for _, m in work.named_modules(remove_duplicate=False))
    inside = [n for n, m in modules.items() if isinstance(m, ReparamBlock | CSLABlock)]
    plan, skipped = [], []
    for name, module in selected_convs(modules, inc, exc, skipped):
        reason = _csla_obstacle(module)
        if not reason and uses[id(module)] > 1:
            reason = "the same module is used under several names"
        if not reason and any(name.startswith(f"{b}.") for b in inside):
            reason = "already inside a block"
        if not reason and not name:
            reason = "the model itself is a conv: wrap it in a module first"
        if reason:
            skipped.append((name, reason))
        else:
            plan.append(name)
    level = 0
    for name in plan:
        conv = modules[name]
        block = CSLABlock(
            conv.in_channels,
            conv.out_channels,
            tuple(conv.kernel_size),
            tuple(conv.stride),
            conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
        ).to(device=conv.weight.device, dtype=conv.weight.dtype)
        level = level + 1 if block.has_identity else 0
        value = 1.0 if scale_init == "ones" or level == 0 else math.sqrt(2.0 / level)
        with torch.no_grad():
            block.weight.copy_(conv.weight)
            if conv.bias is not None:
                block.bias.copy_(conv.bias)
            block.s.fill_(value)
            block.t.fill_(value)
        work.set_submodule(name, block)
    return Conversion(work, tuple(plan), tuple(skipped))


def fuse_csla(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Every :class:`CSLABlock` → the plain ``nn.Conv2d`` it computes (:meth:`CSLABlock.fused`);
    unless ``inplace``, on a deep copy.  A model that is itself a block returns its conv."""
    if isinstance(model, CSLABlock):
        return model.fused()
    work = model if inplace else copy.deepcopy(model)
    for name in [n for n, m in work.named_modules() if isinstance(m, CSLABlock)]:
        work.set_submodule(name, work.get_submodule(name).fused())
    return work


def _blocks(hs_model: nn.Module, where: str) -> dict[str, CSLABlock]:
    if not isinstance(hs_model, nn.Module):
        raise TypeError(f"{where}: expected the hyper-search nn.Module, got {type(hs_model)}")
    blocks = {n: m for n, m in hs_model.named_modules() if isinstance(m, CSLABlock)}
    if not blocks:
        raise ValueError(f"{where}: the model has no CSLABlock (convert it with convert_csla)")
    return blocks


def csla_scales(hs_model: nn.Module) -> dict[str, dict[str, torch.Tensor | None]]:
    """Every CSLA block's scales by module name: ``{name: {"s": (c_out,), "t": (c_out,),
    "u": (c_out,) or None}}`` (detached copies on the CPU; save with ``torch.save``)."""
    out: dict[str, dict[str, torch.Tensor | None]] = {}
    for name, block in _blocks(hs_model, "csla_scales").items():
        out[name] = {
            k: None if v is None else v.detach().cpu().clone()
            for k, v in (("s", block.s), ("t", block.t), ("u", block.u))
        }
    return out


def load_csla_scales(hs_model: nn.Module, scales: Mapping[str, Mapping[str, Any]]) -> None:
    """Copy :func:`csla_scales` output into ``hs_model``'s blocks, strictly by module name.

    Raises:
        ValueError: the block names differ (both differences are listed), a scale has the
            wrong shape, or ``u`` is given for a block without an identity term (or missing
            for one with it).
    """
    where = "load_csla_scales"
    blocks = _blocks(hs_model, where)
    if not isinstance(scales, Mapping):
        raise TypeError(f"{where}: scales must be a mapping name -> {{'s', 't', 'u'}}")
    if set(scales) != set(blocks):
        extra, lacking = sorted(set(scales) - set(blocks)), sorted(set(blocks) - set(scales))
        raise ValueError(
            f"{where}: block names differ (only in the scales: {extra[:5]}, only in the "
            f"model: {lacking[:5]})"
        )
    for name, block in blocks.items():
        entry = scales[name]
        if set(entry) != {"s", "t", "u"}:
            raise ValueError(f"{where}: {name!r} must hold keys s, t, u; got {sorted(entry)}")
        if (entry["u"] is None) != (block.u is None):
            raise ValueError(
                f"{where}: {name!r} has {'no ' if block.u is None else ''}identity term, the "
                f"scales {'do not ' if entry['u'] is None else ''}give u"
            )
        with torch.no_grad():
            for key in ("s", "t", "u"):
                target = getattr(block, key)
                if target is None:
                    continue
                value = torch.as_tensor(entry[key])
                if value.shape != target.shape:
                    raise ValueError(
                        f"{where}: {name!r}.{key} has shape {tuple(value.shape)}, the block "
                        f"{tuple(target.shape)}"
                    )
                target.copy_(value)


def _optimizer_kind(optimizer: str | torch.optim.Optimizer, where: str) -> str:
    if isinstance(optimizer, str):
        if optimizer not in REPOPT_OPTIMIZERS:
            raise ValueError(f"{where}: optimizer must be one of {REPOPT_OPTIMIZERS}, got "
                             f"{optimizer!r}")  # fmt: skip
        return optimizer
    if isinstance(optimizer, torch.optim.SGD):
        return "sgd"
    decoupled = all(g.get("decoupled_weight_decay", False) for g in optimizer.param_groups)
    if isinstance(optimizer, torch.optim.AdamW) or (
        isinstance(optimizer, torch.optim.Adam) and decoupled
    ):
        return "adamw"
    raise ValueError(
        f"{where}: RepOptimizers' multipliers are derived for SGD (any momentum, Nesterov, "
        f"weight decay) and AdamW; got {type(optimizer).__name__}"
    )


def repopt_scalings(
    hs_model: nn.Module, optimizer: str | torch.optim.Optimizer = "sgd"
) -> dict[str, torch.Tensor]:
    """The gradient multipliers ``M`` of every CSLA block, by module name, each of the full
    weight shape ``(c_out, c_in/groups, *K)`` (float64).

    * SGD (``"sgd"`` or a ``torch.optim.SGD``): ``M = s² + t²·[centre] + [o = i]·[centre]``,
      exact (see the module docstring); apply as ``.grad ← M⊙.grad``.
    * AdamW: ``M = |s| + |t|·[centre] + [o = i]·[centre]``, applied to the gradient *and* to
      the adaptive part of the step (:func:`attach_repopt`).  Positions covered by one branch
      match the CSLA block under AdamW exactly; the centre, where branches overlap, matches up
      to ``O(ε)``.  (The authors' code uses ``s + t``, equal only when ``s, t >= 0``.)

    The identity term ``[o = i]`` is there for blocks with ``u`` (``u`` trains, so its
    gradient coefficient is 1 whatever its value).

    Raises:
        ValueError: an entry of ``M`` is 0 (``s_o = 0`` freezes that output channel's
            off-centre weights, a multiplier :class:`~gradshape.SpatialGradientScaling`
            cannot apply; the layer and channels are named).
    """
    kind = _optimizer_kind(optimizer, "repopt_scalings")
    out: dict[str, torch.Tensor] = {}
    for name, block in _blocks(hs_model, "repopt_scalings").items():
        s, t = block.s.detach().double().cpu(), block.t.detach().double().cpu()
        if kind == "sgd":
            s, t = s * s, t * t
        else:
            s, t = s.abs(), t.abs()
        shape = (block.out_channels, block.in_channels // block.groups, *block.kernel_size)
        centre = pad_to_kernel(torch.ones(1, 1, dtype=torch.float64), block.kernel_size)
        m = s.reshape(-1, 1, 1, 1) * torch.ones(shape, dtype=torch.float64)
        m = m + t.reshape(-1, 1, 1, 1) * centre
        if block.u is not None:
            m = m + identity_kernel(
                block.out_channels, block.groups, block.kernel_size, dtype=torch.float64
            )
        zero = (m <= 0).flatten(1).any(1).nonzero().flatten().tolist()
        if zero:
            raise ValueError(
                f"repopt_scalings: {name!r} has s = 0 in output channel(s) {zero[:8]}: the "
                "multiplier would be 0 off the centre, which gradient scaling cannot apply"
            )
        out[name] = m
    return out


@torch.no_grad()
def repopt_reinit(
    model: nn.Module,
    hs_model: nn.Module,
    *,
    identity: str = "trained",
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Initialise the target model's convs from the hyper-search scales (in place; returns
    ``model``).

    For every CSLA block of ``hs_model``, the conv of ``model`` with the same name becomes
    ``W'(0) = s⊙W₃⁰ + t⊙pad(W₁⁰) + u·δ(o = i, centre)``: ``W₃⁰`` is the conv's current weight
    (its default initialisation), ``W₁⁰`` is drawn as a fresh ``nn.Conv2d(c_in, c_out, 1)``'s
    (``kaiming_uniform_(a=√5)``, from ``generator``), ``u`` is the trained one
    (``identity="trained"``) or 1 (``"one"``).  The bias is left as it is.

    Raises:
        ValueError: a block without a conv of the same name and shape in ``model``.
    """
    if identity not in ("trained", "one"):
        raise ValueError(f"repopt_reinit: identity must be 'trained' or 'one', got {identity!r}")
    for name, block in _blocks(hs_model, "repopt_reinit").items():
        try:
            conv = model.get_submodule(name)
        except AttributeError:
            conv = None
        shape = (block.out_channels, block.in_channels // block.groups, *block.kernel_size)
        if not isinstance(conv, nn.Conv2d) or tuple(conv.weight.shape) != shape:
            raise ValueError(
                f"repopt_reinit: the target model has no nn.Conv2d {name!r} with weight shape "
                f"{shape} (is it the model the hyper-search model was converted from?)"
            )
        side = torch.empty(block.weight_1x1.shape, dtype=conv.weight.dtype)
        nn.init.kaiming_uniform_(side, a=math.sqrt(5), generator=generator)
        side = side.to(conv.weight.device)
        s = block.s.detach().to(conv.weight).reshape(-1, 1, 1, 1)
        t = block.t.detach().to(conv.weight).reshape(-1, 1, 1, 1)
        kernel = conv.weight * s + pad_to_kernel(side, block.kernel_size) * t
        if block.u is not None:
            u = block.u.detach() if identity == "trained" else torch.ones_like(block.u)
            eye = identity_kernel(block.out_channels, block.groups, block.kernel_size,
                                  dtype=conv.weight.dtype, device=conv.weight.device)  # fmt: skip
            kernel = kernel + eye * u.to(conv.weight).reshape(-1, 1, 1, 1)
        conv.weight.copy_(kernel)
    return model


def _broadcast(g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    g = g.to(like.device, like.dtype)
    missing = like.dim() - g.dim()
    return g.reshape((1,) * missing + tuple(g.shape)) if missing != 1 else g.unsqueeze(1)


class DecoupledStepScaling(ParameterTransform):
    """Scale the *adaptive* part of each optimizer step by a fixed multiplier, leaving
    decoupled weight decay unscaled (RepOptimizers' AdamW, update half).

    After each ``optimizer.step()``, for a parameter ``w`` that had a gradient, with
    ``d = lr·weight_decay`` when its group's decay is decoupled (``torch.optim.AdamW``, or Adam
    with ``decoupled_weight_decay``) and ``d = 0`` otherwise:

        w ← w_old·(1 − d) + M ⊙ (w_new − w_old·(1 − d)).

    Args:
        params: name → weight Parameter.
        scalings: name → ``M`` of shape ``K``, ``(c_out, *K)`` or the weight's shape, > 0.
        optimizer: the optimizer whose steps are scaled.
    """

    def __init__(
        self,
        params: Mapping[str, nn.Parameter],
        scalings: Mapping[str, torch.Tensor],
        optimizer: torch.optim.Optimizer,
    ) -> None:
        if set(params) != set(scalings):
            raise ValueError(
                f"DecoupledStepScaling: params and scalings name different layers "
                f"({sorted(set(params) ^ set(scalings))[:5]})"
            )
        self._scalings = {n: self._checked(n, params[n], g) for n, g in scalings.items()}
        super().__init__(params, mode="update", optimizer=optimizer)

    @staticmethod
    def _checked(name: str, param: torch.Tensor, g: Any) -> torch.Tensor:
        g = torch.as_tensor(g).detach().to("cpu", torch.float64)
        shape = tuple(param.shape)
        allowed = (shape[2:], (shape[0], *shape[2:]), shape)
        if tuple(g.shape) not in allowed:
            raise ValueError(
                f"DecoupledStepScaling: scaling for {name!r} has shape {tuple(g.shape)}; "
                f"expected one of {allowed}"
            )
        if not bool(torch.isfinite(g).all()) or not bool((g > 0).all()):
            raise ValueError(f"DecoupledStepScaling: scaling for {name!r} must be finite and > 0")
        return g.clone()

    @property
    def scalings(self) -> dict[str, torch.Tensor]:
        """Layer name → ``M`` (copies)."""
        return {n: g.clone() for n, g in self._scalings.items()}

    def apply(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor * _broadcast(self._scalings[name], tensor)

    @torch.no_grad()
    def _after_step(self, optimizer, args, kwargs) -> None:
        groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        for name, p in self._params.items():
            old = self._snapshot.get(name)
            if old is None or p.grad is None:  # optimizers skip parameters without a gradient
                continue
            group = groups[id(p)]
            decoupled = isinstance(optimizer, torch.optim.AdamW) or group.get(
                "decoupled_weight_decay", False
            )
            decay = float(group["lr"]) * float(group.get("weight_decay", 0.0)) if decoupled else 0
            base = old * (1 - decay) if decay else old
            p.copy_(base + self.apply(name, p - base))

    def state_dict(self) -> dict[str, Any]:
        return {"scalings": self.scalings}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        super().load_state_dict(state_dict)
        scalings = state_dict.get("scalings")
        if not isinstance(scalings, Mapping) or set(scalings) != set(self._params):
            raise ValueError(
                "DecoupledStepScaling.load_state_dict: 'scalings' must name exactly the layers "
                f"{sorted(self._params)[:5]}"
            )
        self._scalings = {n: self._checked(n, self._params[n], g) for n, g in scalings.items()}


def attach_repopt(
    model: nn.Module,
    scalings: Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
) -> Composed:
    """Train a plain model as RepOptimizers do: ``M`` on each named conv's gradient, and for
    AdamW on the adaptive part of its step too.

    ``scalings`` is :func:`repopt_scalings`'s output (keyed by the conv names of ``model``).
    SGD: a :class:`~gradshape.SpatialGradientScaling` in ``mode="gradient"`` with each ``M``
    pinned by ``set_scaling`` (exact).  AdamW: the same, composed with
    :class:`DecoupledStepScaling` (``M`` on ``w_new − w_old + lr·wd·w_old``; decoupled decay
    unscaled).  Returns the composition; its ``state_dict`` holds the multipliers and
    ``remove()`` detaches everything.  Do not clip gradients (it breaks the equivalence).

    Raises:
        ValueError: an optimizer other than SGD/AdamW; a name that is not a conv of ``model``.
    """
    kind = _optimizer_kind(optimizer, "attach_repopt")
    if not scalings:
        raise ValueError("attach_repopt: no scalings given")
    modules = dict(model.named_modules())
    unknown = [n for n in scalings if not isinstance(modules.get(n), nn.Conv2d)]
    if unknown:
        raise ValueError(f"attach_repopt: {unknown[:5]} are not nn.Conv2d modules of the model")
    names = list(scalings)
    sgs = SpatialGradientScaling(model, include=names)
    for name in names:
        sgs.set_scaling(name, scalings[name])
    if kind == "sgd":
        return compose(sgs)
    weights = {n: sgs.parameters[n] for n in names}
    return compose(sgs, DecoupledStepScaling(weights, scalings, optimizer))
