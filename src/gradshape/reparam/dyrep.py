"""DyRep: grow the most salient convolutions into branch blocks while training, prune weak
branches, and fuse everything back into plain convolutions.

Huang et al., "DyRep: Bootstrapping Training with Dynamic Re-parameterization", CVPR 2022
(rules as in ``/shared/specs/dyrep.md``: saliency, schedule, growth, pruning, recalibration).

* :class:`DyRepBlock`: a conv grown into up to seven branches, each ending in its own
  BatchNorm, outputs summed: K×K (``dense``), 1×1 (``pointwise``), 1×1 → K×K (``seq``),
  1×1 → K×K average pooling (``avg``), 1×K (``hor``), K×1 (``ver``) and BatchNorm of the
  input (``identity``).
* :class:`DyRep`: the controller.  It records every conv's saliency each step, and at the
  scheduled epochs grows the most salient conv into a :class:`DyRepBlock` (function-preserving
  in eval mode), cuts weak branches, and keeps the optimizer's parameter groups and state in
  step with the model.
* :func:`fuse_dyrep`: every block → one plain conv (optionally folding the net's own
  BatchNorms too).
* :func:`branches_to_cut`, :func:`recalibrate_batchnorm`: the pruning rule and the BatchNorm
  re-estimation, as plain functions.
"""

from __future__ import annotations

import copy
import math
import numbers
import statistics
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..batches import batch_input, run_model, to_device
from ..distributed import all_reduce_, check_same_on_all_ranks, fail_together, rank_and_world
from ..selection import LayerSelector, layer_predicate, unwrap_model
from ..transform import GradientTransform
from .blocks import (
    ConvBranch,
    PointwiseBranch,
    ReparamBlock,
    conv_from_kernel,
    conversion_obstacle,
)
from .convert import following_batchnorms
from .fusion import (
    KernelBias,
    add_branches,
    avg_pool_kernel,
    batchnorm_affine,
    identity_kernel,
    merge_sequential,
    pad_to_kernel,
)
from .fusion import fold_batchnorm as _fold_bn

__all__ = [
    "DYREP_BRANCHES",
    "DYREP_METRICS",
    "AdjustReport",
    "DyRep",
    "DyRepBlock",
    "branches_to_cut",
    "fuse_dyrep",
    "growable_branches",
    "recalibrate_batchnorm",
]

#: The branches a :class:`DyRepBlock` can hold, in their fixed order (``dense`` always).
DYREP_BRANCHES = ("dense", "pointwise", "seq", "avg", "hor", "ver", "identity")
#: Saliency measures: SynFlow Σ g·w (signed, the default), ‖g‖, SNIP Σ|g·w|, random.
DYREP_METRICS = ("synflow", "grad_norm", "snip", "random")

_GAMMA_NEW = 0.01  # γ of each new branch's last BatchNorm (DyRep's small start)

Pair = tuple[int, int]


def _conv_padding(conv: nn.Conv2d) -> Pair:
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        return (conv.kernel_size[0] // 2, conv.kernel_size[1] // 2)
    return (int(conv.padding[0]), int(conv.padding[1]))


def growable_branches(
    in_channels: int,
    out_channels: int,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
) -> tuple[str, ...]:
    """The branches DyRep grows a conv of this geometry into (a subset of
    :data:`DYREP_BRANCHES`).

    All but ``identity`` when the padding is ``K // 2`` (the identity too when
    ``in_channels == out_channels`` and the stride is 1); only ``dense``, ``seq`` and ``avg``
    for any other padding (the upstream rule, DyRep's ``dbb_branches_unequal``).
    """
    kh, kw = kernel_size
    if tuple(padding) != (kh // 2, kw // 2):
        return ("dense", "seq", "avg")
    names = ["dense", "pointwise", "seq", "avg", "hor", "ver"]
    if in_channels == out_channels and tuple(stride) == (1, 1):
        names.append("identity")
    return tuple(names)


def _conv_kernel_bias(module: nn.Module) -> KernelBias:
    """A plain conv's ``(weight, bias)``, or a nested block's eval-mode equivalent."""
    if isinstance(module, DyRepBlock):
        return module.get_equivalent_kernel_bias()
    bias = module.bias if module.bias is not None else module.weight.new_zeros(module.out_channels)
    return module.weight, bias


class DyRepBlock(ReparamBlock):
    """A conv grown by DyRep: the branches of :func:`growable_branches`, each ending in its own
    BatchNorm, outputs summed (Huang et al., CVPR 2022; DBB's branches plus 1×K, K×1 and
    identity).

    ``y = dense(x) + Σ_{n ∈ branches} branch_n(x)`` with

    * ``dense``: K×K conv (with bias) → BN; ``pointwise``: 1×1 → BN; ``hor``/``ver``: 1×K / K×1
      → BN; ``identity``: BN(x);
    * ``seq``: 1×1 (``in → in``) → BN → pad → K×K → BN; ``avg``: 1×1 (``in → out``) → BN →
      pad → K×K average pooling → BN (the padding is DBB's "BN and pad", exact in eval mode).

    The block stands in for the conv only: a BatchNorm that followed the conv stays after the
    block.  The K×K convs inside (``dense.conv`` and ``seq.spatial``) may themselves be grown
    into blocks once (DyRep's one level of nesting); :meth:`get_equivalent_kernel_bias` folds
    nested blocks first.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, groups, padding_mode: the
            conv's geometry (odd kernels; see :class:`~gradshape.reparam.ReparamBlock`).
        bias: whether ``dense.conv`` has a bias (grown blocks always have one).
        bn: must be ``"per_branch"``.
        eps, momentum: for the block's BatchNorms.
        branches: the active branches (default: all of :func:`growable_branches`); must hold
            ``"dense"`` and be growable for this geometry.

    A freshly constructed block has PyTorch's default initialisation; :meth:`grown_from` builds
    one equal to a given conv.
    """

    kind = "dyrep"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int] = 3,
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] | None = None,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        bn: str = "per_branch",
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        *,
        branches: Sequence[str] | None = None,
    ) -> None:
        if bn != "per_branch":
            raise ValueError(
                f"DyRepBlock: every branch ends in its own BatchNorm; bn must be 'per_branch', "
                f"got {bn!r}"
            )
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            groups,
            bias=bias,
            padding_mode=padding_mode,
            bn=bn,
            eps=eps,
            momentum=momentum,
        )
        possible = growable_branches(
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding
        )
        chosen = possible if branches is None else tuple(branches)
        bad = [n for n in chosen if n not in possible]
        if bad or "dense" not in chosen or len(set(chosen)) != len(chosen):
            raise ValueError(
                f"DyRepBlock: branches {tuple(chosen)} are not valid for this geometry; give "
                f"distinct names including 'dense' from {possible}"
            )
        self.branches: tuple[str, ...] = tuple(n for n in DYREP_BRANCHES if n in chosen)
        for name in self.branches[1:]:
            self.add_module(name, self._make_branch(name))

    def _make_branch(self, name: str) -> nn.Module:
        kh, kw = self.kernel_size
        if name == "pointwise":
            return self._branch((1, 1))
        if name == "hor":
            return self._branch((1, kw))
        if name == "ver":
            return self._branch((kh, 1))
        if name == "identity":
            return self._norm(self.in_channels)
        mid = self.in_channels if name == "seq" else self.out_channels
        return self._pointwise_branch(mid, pooling=name == "avg")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dense(x)
        for name in self.branches[1:]:
            y = y + getattr(self, name)(x)
        return y

    # ---- fusion --------------------------------------------------------------------------
    def branch_kernel_bias(self, name: str) -> KernelBias:
        """One branch as a K×K ``(kernel, bias)`` in eval mode (nested blocks folded first)."""
        if name not in self.branches:
            raise KeyError(f"DyRepBlock: no active branch {name!r}; active: {self.branches}")
        module = getattr(self, name)
        if name == "identity":
            weight = module.weight
            kernel = identity_kernel(
                self.out_channels,
                self.groups,
                self.kernel_size,
                dtype=weight.dtype,
                device=weight.device,
            )
            return _fold_bn(kernel, None, module)
        if isinstance(module, ConvBranch):
            kernel, bias = _fold_bn(*_conv_kernel_bias(module.conv), module.bn)
            return pad_to_kernel(kernel, module.full_kernel), bias
        first = _fold_bn(module.pointwise.weight, None, module.pad.bn)
        if isinstance(module.spatial, nn.AvgPool2d):
            weight = module.pointwise.weight
            pool = avg_pool_kernel(
                weight.shape[0],
                self.groups,
                self.kernel_size,
                dtype=weight.dtype,
                device=weight.device,
            )
            second = _fold_bn(pool, None, module.bn)
        else:
            second = _fold_bn(*_conv_kernel_bias(module.spatial), module.bn)
        return merge_sequential(*first, *second, groups=self.groups)

    def get_equivalent_kernel_bias(self) -> KernelBias:
        """The ``(kernel, bias)`` of the one conv this block equals in eval mode (nested blocks
        folded inner first); differentiable in the block's parameters."""
        return add_branches([self.branch_kernel_bias(n) for n in self.branches])

    def _silence_side_branches(self) -> None:
        super()._silence_side_branches()
        if "identity" in self.branches:
            with torch.no_grad():
                self.identity.weight.zero_()
                self.identity.bias.zero_()

    # ---- growth and pruning --------------------------------------------------------------
    def last_norm(self, name: str) -> nn.BatchNorm2d:
        """The BatchNorm that ends branch ``name`` (whose γ the pruning rule reads)."""
        module = getattr(self, name)
        return module if name == "identity" else module.bn

    def _norms(self, name: str) -> list[nn.BatchNorm2d]:
        module = getattr(self, name)
        if name == "identity":
            return [module]
        if isinstance(module, PointwiseBranch):
            return [module.pad.bn, module.bn]
        return [module.bn]

    @torch.no_grad()
    def set_equivalent(self, kernel: torch.Tensor, bias: torch.Tensor) -> None:
        """Make the block equal the conv ``(kernel, bias)`` in eval mode, keeping every branch
        but ``dense`` as it is (DyRep's growth step 3 and its pruning fold).

        The dense BatchNorm is reset (γ = 1, β = 0, μ = 0, σ² = 1) and the dense conv solves
        ``fold(dense) = (kernel, bias) − Σ_{other branches} fold(branch)``: with the reset
        BatchNorm's exact fold factor ``s = 1/√(1 + ε)``, the conv gets ``kernel'/s`` and
        ``bias'/s`` (a nested block is set the same way, recursively).  The BatchNorm's own
        ε is inverted, so the match is exact up to round-off, not ``O(ε)``.
        """
        expected = (self.out_channels, self.in_channels // self.groups, *self.kernel_size)
        if tuple(kernel.shape) != expected or tuple(bias.shape) != (self.out_channels,):
            raise ValueError(
                f"DyRepBlock.set_equivalent: kernel {tuple(kernel.shape)} and bias "
                f"{tuple(bias.shape)} do not match the block's {expected} and "
                f"({self.out_channels},)"
            )
        others = [self.branch_kernel_bias(n) for n in self.branches[1:]]
        if others:
            other_kernel, other_bias = add_branches(others)
            kernel, bias = kernel - other_kernel, bias - other_bias
        norm = self.dense.bn
        norm.reset_running_stats()
        norm.weight.fill_(1.0)
        norm.bias.zero_()
        scale, shift = batchnorm_affine(norm)
        conv_kernel = kernel / scale.reshape(-1, 1, 1, 1)
        conv_bias = (bias - shift) / scale
        target = self.dense.conv
        if isinstance(target, DyRepBlock):
            target.set_equivalent(conv_kernel, conv_bias)
        elif target.bias is not None:
            target.weight.copy_(conv_kernel)
            target.bias.copy_(conv_bias)
        else:  # no conv bias: the reset BatchNorm's β carries it (β adds after the scale)
            target.weight.copy_(conv_kernel)
            norm.bias.copy_(bias)

    @classmethod
    def _in_place_of(cls, conv: nn.Conv2d, branches: Sequence[str] | None = None) -> DyRepBlock:
        """A block of ``conv``'s geometry (with a dense bias) on its device and dtype, freshly
        initialised without consuming the global RNG."""
        with torch.random.fork_rng(devices=[]):
            block = cls(
                conv.in_channels,
                conv.out_channels,
                tuple(conv.kernel_size),
                tuple(conv.stride),
                _conv_padding(conv),
                conv.groups,
                bias=True,
                padding_mode=conv.padding_mode,
                branches=branches,
            )
        return block.to(device=conv.weight.device, dtype=conv.weight.dtype)

    @classmethod
    def grown_from(cls, conv: nn.Conv2d, *, generator: torch.Generator | None = None) -> DyRepBlock:
        """The block DyRep grows ``conv`` into, equal to it in eval mode.

        Initialisation (DyRep): the new convs get ``N(0, 2/(kh·kw·c_out))`` (drawn from
        ``generator`` on the CPU, in float64, then cast; default: the global RNG), each new
        branch's last BatchNorm γ = 0.01 and its earlier ones γ = 1, all β = 0 and reset
        running statistics; then :meth:`set_equivalent` with the conv's ``(W, b)``.  Building
        the modules does not consume the global RNG.  Recalibrating the new BatchNorms
        (:func:`recalibrate_batchnorm`) and calling ``set_equivalent(W, b)`` again keeps the
        equality (what :class:`DyRep` does).

        Raises:
            ValueError: ``conv`` cannot be grown (not a plain ``nn.Conv2d``, even or 1×1
                kernel, dilation, parametrized weight; the reason is named).
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"DyRepBlock.grown_from: expected an nn.Conv2d, got {type(conv)}")
        obstacle = conversion_obstacle(conv)
        if obstacle:
            raise ValueError(f"DyRepBlock.grown_from: {obstacle}")
        weight = conv.weight.detach().clone()
        bias = _conv_kernel_bias(conv)[1].detach().clone()
        block = cls._in_place_of(conv)
        with torch.no_grad():
            for name in block.branches[1:]:
                for module in getattr(block, name).modules():
                    if isinstance(module, nn.Conv2d):
                        fan_out = module.kernel_size[0] * module.kernel_size[1]
                        fan_out *= module.out_channels
                        draw = torch.empty(module.weight.shape, dtype=torch.float64)
                        draw.normal_(0.0, math.sqrt(2.0 / fan_out), generator=generator)
                        module.weight.copy_(draw)
                        if module.bias is not None:
                            module.bias.zero_()
                norms = block._norms(name)
                for i, norm in enumerate(norms):
                    norm.reset_running_stats()
                    norm.weight.fill_(_GAMMA_NEW if i == len(norms) - 1 else 1.0)
                    norm.bias.zero_()
        block.set_equivalent(weight, bias)
        return block

    def branch_ratios(self) -> dict[str, float]:
        """``r_n = mean|γ_n| / mean|γ_dense|`` for each active branch but ``dense``, from each
        branch's last BatchNorm (DyRep's pruning score).  Empty when ``mean|γ_dense|`` is 0
        or not finite (no ratio is defined)."""
        ref = float(self.dense.bn.weight.detach().abs().mean())
        if not (math.isfinite(ref) and ref > 0):
            return {}
        return {
            n: float(self.last_norm(n).weight.detach().abs().mean()) / ref
            for n in self.branches[1:]
        }

    @torch.no_grad()
    def remove_branches(self, names: Iterable[str]) -> None:
        """Delete the branches ``names`` and fold them into ``dense`` (no recalibration): the
        eval-mode function is unchanged (see :meth:`set_equivalent`)."""
        names = tuple(names)
        bad = [n for n in names if n == "dense" or n not in self.branches]
        if bad:
            raise ValueError(
                f"DyRepBlock.remove_branches: cannot remove {bad}; removable: {self.branches[1:]}"
            )
        kernel, bias = (t.detach().clone() for t in self.get_equivalent_kernel_bias())
        for name in names:
            delattr(self, name)
        self.branches = tuple(n for n in self.branches if n not in names)
        self.set_equivalent(kernel, bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", branches={self.branches}"


def branches_to_cut(
    ratios: Mapping[str, float], threshold: float = 0.1, min_std: float = 0.02
) -> tuple[str, ...]:
    """DyRep's pruning rule for one block.

    With ``V`` the ratios of the active non-dense branches (see
    :meth:`DyRepBlock.branch_ratios`): when the unbiased standard deviation of ``V`` exceeds
    ``min_std`` (so at least two branches), cut every branch with ``r < mean(V)`` and
    ``r < threshold``.  Returns the names to cut, in the order given.
    """
    values = list(ratios.values())
    if len(values) < 2 or not all(math.isfinite(v) for v in values):
        return ()
    if statistics.stdev(values) <= min_std:
        return ()
    mean = statistics.fmean(values)
    return tuple(n for n, r in ratios.items() if r < mean and r < threshold)


def recalibrate_batchnorm(
    model: nn.Module, norms: Sequence[nn.modules.batchnorm._BatchNorm], batches: Iterable[Any]
) -> int:
    """Re-estimate the running statistics of ``norms`` (BatchNorms inside ``model``) on
    ``batches``; returns the number of batches seen.

    The model runs under ``torch.no_grad()`` in eval mode except ``norms``, which run in
    training mode with ``momentum=None`` (a cumulative average over the batches) after a reset
    of their statistics; nothing else changes, and every module's training flag and each
    BatchNorm's momentum are restored.  Under ``torch.distributed`` it is a collective: the
    statistics are averaged over the ranks (each rank passes its own batches).  ``batches``
    yields input tensors, ``(input, target, ...)`` tuples or dicts of keyword arguments.

    Raises:
        ValueError: ``batches`` is empty (on every rank when one rank's is).
    """
    modes = [(m, m.training) for m in model.modules()]
    momenta = [(bn, bn.momentum) for bn in norms]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    seen = 0
    try:
        model.eval()
        for bn in norms:
            bn.reset_running_stats()
            bn.momentum = None
            bn.train()
        with fail_together("DyRep BatchNorm recalibration"), torch.no_grad():
            for batch in batches:
                run_model(model, to_device(batch_input(batch, "recalibration"), device))
                seen += 1
            if not seen:
                raise ValueError("recalibrate_batchnorm: the batch iterable is empty")
    finally:
        for m, training in modes:
            m.training = training
        for bn, momentum in momenta:
            bn.momentum = momentum
    world = rank_and_world()[1]
    if world > 1:
        for bn in norms:
            all_reduce_(bn.running_mean, "sum").div_(world)
            all_reduce_(bn.running_var, "sum").div_(world)
    return seen


def _outermost_blocks(model: nn.Module) -> list[str]:
    names: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, DyRepBlock) and not any(
            name == n or name.startswith(f"{n}.") for n in names
        ):
            names.append(name)
    return names


def _fold_following(model: nn.Module) -> None:
    modules = dict(model.named_modules())
    for conv_name, bn_name in following_batchnorms(model).items():
        conv, bn = modules[conv_name], modules[bn_name]
        if type(conv) is not nn.Conv2d or bn.running_mean is None:
            continue
        folded = conv_from_kernel(conv, *_fold_bn(conv.weight, conv.bias, bn))
        model.set_submodule(conv_name, folded)
        model.set_submodule(bn_name, nn.Identity())


def fuse_dyrep(
    model: nn.Module, *, fold_batchnorm: bool = False, inplace: bool = False
) -> nn.Module:
    """Replace every (outermost) :class:`DyRepBlock` by one plain ``nn.Conv2d`` with bias.

    Nested blocks are folded inner first (DyRep's deploy step).  With ``fold_batchnorm`` every
    plain conv whose output feeds only a BatchNorm (:func:`~gradshape.reparam.
    following_batchnorms`) absorbs it and the BatchNorm becomes ``nn.Identity``: the deployed
    net then has one conv with bias per conv, as the fused ACB/DBB blocks have.  The result
    equals ``model`` in eval mode up to round-off.  Unless ``inplace``, a deep copy is fused;
    a model that is itself a block is returned as its fused conv.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse_dyrep: model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, DyRepBlock):
        return model.fused()
    work = model if inplace else copy.deepcopy(model)
    for name in _outermost_blocks(work):
        work.set_submodule(name, work.get_submodule(name).fused())
    if fold_batchnorm:
        _fold_following(work)
    return work


@dataclass
class AdjustReport:
    """What one :meth:`DyRep.adjust` did.

    Attributes:
        epoch: the epoch after which it ran (``None`` when called without one).
        grown: the conv grown into a block (``None``: no conv had a score).
        score: the grown conv's score.
        scores: every candidate's score (mean over the steps since the last adjustment and
            over the ranks), by name.
        cut: block name → the branches cut from it.
        collapsed: blocks left with ``dense`` only, now plain convs with bias.
        changed: whether any parameter was added or removed (re-wrap DDP, rebuild EMA, ...).
    """

    epoch: int | None
    grown: str | None
    score: float | None
    scores: dict[str, float]
    cut: dict[str, tuple[str, ...]] = field(default_factory=dict)
    collapsed: tuple[str, ...] = ()
    changed: bool = False


def _check_int(value: Any, label: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"DyRep: {label} must be an int >= {low}, got {value!r}")
    return int(value)


def _check_real(value: Any, label: str) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value < 0:
        raise ValueError(f"DyRep: {label} must be a finite real >= 0, got {value!r}")
    return float(value)


class DyRep(GradientTransform):
    r"""Dynamic structural reparameterization (Huang et al., "DyRep: Bootstrapping Training
    with Dynamic Re-parameterization", CVPR 2022).

    Every step, after ``backward()`` (and any clipping) and **before** ``optimizer.step()``,
    :meth:`record` adds each candidate conv's saliency ``s_l = Σ g ⊙ w`` (SynFlow, signed,
    over the conv weight; ``metric`` picks ``‖g‖``, ``Σ|g ⊙ w|`` or random instead).  After
    epoch ``e`` with ``(e + 1) % interval == 0`` and ``e < max_adjust``,
    :meth:`maybe_adjust`:

    1. grows the conv with the highest mean score into a :class:`DyRepBlock` equal to it in
       eval mode (new branches drawn from a generator seeded by ``seed`` and the adjustment
       count; the block's BatchNorms re-estimated on the batches given, then the K×K branch
       re-solved so the equality is exact);
    2. cuts, in every block, the branches that :func:`branches_to_cut` names (with
       ``threshold`` and ``min_std``), folding them into the K×K branch (the rule never
       empties a block; :meth:`cut` can, and a block left with its K×K branch only becomes a
       plain conv with bias);
    3. puts each new parameter into the optimizer's group that held the replaced conv's weight
       (weights) or bias (1-D parameters; without a bias, the one group holding the model's
       other 1-D parameters), or where ``group_of(name, param)`` says; drops removed
       parameters and their optimizer state (the grown conv's momentum is lost, as upstream);
       orders each group's parameters as ``model.named_parameters()``;
    4. clears the scores, calls every ``on_change`` callback if parameters changed, and returns
       an :class:`AdjustReport`.

    Candidates: every plain ``nn.Conv2d`` with a square odd kernel K > 1 (any stride and
    groups, a 7×7 stem too) whose weight the optimizer holds, plus the K×K convs inside grown
    blocks, one level deep; ``include``/``exclude`` narrow them.

    Args:
        model: the network (a ``DistributedDataParallel``/``torch.compile`` wrapper is
            unwrapped; names are the plain model's).
        optimizer: the optimizer over ``model``'s parameters.
        interval, max_adjust: the schedule above (DyRep's CIFAR config: 15 and 500).
        metric: one of :data:`DYREP_METRICS`.
        threshold, min_std: the pruning rule's constants (0.1 and 0.02).
        group_of: ``(name, param) -> group index`` for new parameters (needed when the model's
            1-D parameters are spread over several groups).
        seed: seeds the new branches' weights (and the ``random`` metric).
        include, exclude: module names, fnmatch patterns or a predicate ``(name, module)``.
        on_change: called with the :class:`AdjustReport` after every change of parameters (and
            after :meth:`load_state_dict` rebuilds the structure, with ``grown=None``).

    Under DistributedDataParallel (and anything else holding the old parameters)
        Construct the same DyRep on every rank, call :meth:`record` every step and
        :meth:`maybe_adjust` on every rank at the same epochs (it is a collective: the scores
        are all-reduced once, so every rank grows and cuts the same layers; the recalibration
        statistics are averaged over the ranks).  After a change the old DDP wrapper still
        holds the removed parameters: wrap the model anew, and rebuild what else refers to
        parameters (EMA copies, ``torch.compile``, hooks on removed params, DDP comm hooks)::

            report = dyrep.maybe_adjust(epoch, recal_batches)   # every rank
            if report is not None and report.changed:
                ddp_model = DistributedDataParallel(model, device_ids=[local_rank])
                ddp_model.register_comm_hook(...)               # if you used one

        Do the same after :meth:`load_state_dict`, or put it in one ``on_change`` callback.

    Under AMP pass the ``GradScaler`` to :meth:`record`: it unscales the gradients first
    (``scaler.unscale_(optimizer)``; ``scaler.step`` then does not unscale again), and steps
    with inf/NaN gradients are not counted.

    Checkpoints: :meth:`state_dict` holds the structure (block paths and branches, collapsed
    convs), the running scores and the adjustment count.  To resume, build the plain model and
    the optimizer as at the start, then ``dyrep.load_state_dict(...)`` (rebuilds the
    structure and the optimizer's groups), then ``model.load_state_dict(..., strict=True)`` and
    ``optimizer.load_state_dict(...)``: training continues bit for bit.

    .. warning::
        Deviations from the authors' code, on purpose: scores are reduced over ranks once
        per adjustment, not every step; pruning folds into a nested K×K block without
        re-initialising it; the reset BatchNorm's ``1/√(1 + ε)`` is inverted exactly; resume
        is strict; collapsed convs are part of the saved structure.

    Example::

        dyrep = DyRep(model, optimizer, interval=15, max_adjust=500)
        for epoch in range(epochs):
            for x, y in loader:
                optimizer.zero_grad()
                loss_fn(model(x), y).backward()
                dyrep.record()
                optimizer.step()
            dyrep.maybe_adjust(epoch, recal_batches)     # 20 training batches
        deploy = dyrep.fuse(fold_batchnorm=True)
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        interval: int = 15,
        max_adjust: int = 500,
        metric: str = "synflow",
        threshold: float = 0.1,
        min_std: float = 0.02,
        group_of: Callable[[str, nn.Parameter], int] | None = None,
        seed: int = 0,
        include: LayerSelector = None,
        exclude: LayerSelector = None,
        on_change: Callable[[AdjustReport], None] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"DyRep: model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"DyRep: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if metric not in DYREP_METRICS:
            raise ValueError(f"DyRep: metric must be one of {DYREP_METRICS}, got {metric!r}")
        for label, fn in (("group_of", group_of), ("on_change", on_change)):
            if fn is not None and not callable(fn):
                raise TypeError(f"DyRep: {label} must be callable")
        self.model = unwrap_model(model)
        self.optimizer = optimizer
        self.interval = _check_int(interval, "interval", 1)
        self.max_adjust = _check_int(max_adjust, "max_adjust", 0)
        self.metric = metric
        self.threshold = _check_real(threshold, "threshold")
        self.min_std = _check_real(min_std, "min_std")
        self.seed = _check_int(seed, "seed", 0)
        self.group_of = group_of
        self._include = layer_predicate(include, "include")
        self._exclude = layer_predicate(exclude, "exclude")
        self._callbacks: list[Callable[[AdjustReport], None]] = [on_change] if on_change else []
        self._collapsed: set[str] = set()
        self.adjustments = 0
        self.last_adjust_epoch: int | None = None
        self.history: list[AdjustReport] = []
        self._refresh_candidates()

    # ---- candidates and scores -----------------------------------------------------------
    def _refresh_candidates(self) -> None:
        self._candidates = self._find_candidates()
        self._sums: torch.Tensor | None = None
        self._counts: torch.Tensor | None = None

    def _find_candidates(self) -> dict[str, nn.Conv2d]:
        modules = dict(self.model.named_modules())
        uses = Counter(id(m) for _, m in self.model.named_modules(remove_duplicate=False))
        held = self._held()
        out: dict[str, nn.Conv2d] = {}
        for name, m in modules.items():
            if not name or type(m) is not nn.Conv2d or conversion_obstacle(m):
                continue
            if m.kernel_size[0] != m.kernel_size[1] or uses[id(m)] > 1:
                continue
            parts = name.split(".")
            ancestors = [modules[".".join(parts[:i])] for i in range(1, len(parts))]
            blocks = [a for a in ancestors if isinstance(a, ReparamBlock)]
            if len(blocks) > 1 or any(not isinstance(b, DyRepBlock) for b in blocks):
                continue
            if self._include is not None and not self._include(name, m):
                continue
            if self._exclude is not None and self._exclude(name, m):
                continue
            if id(m.weight) in held:
                out[name] = m
        return out

    @property
    def candidates(self) -> dict[str, nn.Conv2d]:
        """The convs DyRep may grow now, by name (a copy)."""
        return dict(self._candidates)

    @torch.no_grad()
    def record(self, scaler: torch.amp.GradScaler | None = None) -> None:
        """Add this step's saliency of every candidate; call after ``backward()`` (and
        clipping) and before ``optimizer.step()``.

        With ``scaler`` (an enabled ``GradScaler`` whose gradients are still scaled) the
        gradients are unscaled first by ``scaler.unscale_(optimizer)``.  A step whose value is
        not finite (an AMP overflow the scaler will skip) is not counted; a candidate without a
        gradient this step is not counted either.  No device synchronisation.
        """
        if scaler is not None and scaler.is_enabled():
            scaler.unscale_(self.optimizer)
        convs = list(self._candidates.values())
        if not convs:
            return
        device = convs[0].weight.device
        values, present = [], []
        for conv in convs:
            grad = conv.weight.grad
            if grad is None or self.metric == "random":
                values.append(torch.zeros((), dtype=torch.float64, device=device))
                present.append(grad is not None)
                continue
            if self.metric == "synflow":
                value = torch.sum(grad * conv.weight)
            elif self.metric == "snip":
                value = torch.sum(torch.abs(grad * conv.weight))
            else:
                value = torch.linalg.vector_norm(grad)
            values.append(value.to(device, torch.float64))
            present.append(True)
        stacked = torch.stack(values)
        counted = torch.isfinite(stacked) & torch.tensor(present, device=device)
        if self._sums is None:
            self._sums = torch.zeros(len(convs), dtype=torch.float64, device=device)
            self._counts = torch.zeros(len(convs), dtype=torch.int64, device=device)
        self._sums += torch.where(counted, stacked, torch.zeros_like(stacked))
        self._counts += counted

    def scores(self) -> dict[str, float]:
        """This rank's mean score per candidate since the last adjustment (candidates without
        a counted step are left out); synchronises with the device."""
        if self._sums is None:
            return {}
        return {
            n: float(s) / int(c)
            for n, s, c in zip(self._candidates, self._sums.tolist(), self._counts.tolist(),
                               strict=True)
            if c > 0
        }  # fmt: skip

    def _reduced_scores(self, generator: torch.Generator) -> dict[str, float]:
        names = list(self._candidates)
        if not names:
            return {}
        n = len(names)
        if self._sums is None:
            buffer = torch.zeros(2 * n, dtype=torch.float64)
        else:
            buffer = torch.cat([self._sums, self._counts.double()])
        all_reduce_(buffer, "sum")
        sums, counts = buffer[:n].tolist(), buffer[n:].tolist()
        if self.metric == "random":
            draws = torch.rand(n, generator=generator, dtype=torch.float64).tolist()
            return {name: d for name, d, c in zip(names, draws, counts, strict=True) if c > 0}
        return {name: s / c for name, s, c in zip(names, sums, counts, strict=True) if c > 0}

    # ---- schedule ------------------------------------------------------------------------
    def due(self, epoch: int) -> bool:
        """Whether an adjustment is due after epoch ``epoch`` (0-based): ``(epoch + 1) %
        interval == 0`` and ``epoch < max_adjust``."""
        if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral) or epoch < 0:
            raise ValueError(f"DyRep.due: epoch must be an int >= 0, got {epoch!r}")
        return (epoch + 1) % self.interval == 0 and epoch < self.max_adjust

    def maybe_adjust(self, epoch: int, batches: Iterable[Any] | None = None) -> AdjustReport | None:
        """:meth:`adjust` after epoch ``epoch`` if :meth:`due` (once per epoch); else ``None``.
        A collective under ``torch.distributed``: call it on every rank."""
        if not self.due(epoch) or self.last_adjust_epoch == epoch:
            return None
        return self.adjust(batches, epoch=epoch)

    # ---- the adjustment ------------------------------------------------------------------
    def _held(self) -> dict[int, int]:
        return {id(p): i for i, g in enumerate(self.optimizer.param_groups) for p in g["params"]}

    def _vector_group(self, fallback: int) -> int:
        held = self._held()
        groups = {held[id(p)] for p in self.model.parameters() if p.dim() <= 1 and id(p) in held}
        if len(groups) > 1:
            raise ValueError(
                f"DyRep: the model's 1-D parameters (biases, BatchNorm γ and β) are spread over "
                f"optimizer groups {sorted(groups)}; pass group_of=(name, param) -> group index "
                "to say where new ones go"
            )
        return groups.pop() if groups else fallback

    def _origin_groups(self, module: nn.Module, assigned: dict[int, int]) -> tuple[int, int]:
        """(group for new weights, group for new 1-D params) of what replaces ``module``;
        ``assigned`` holds the groups of parameters added earlier in the same change."""
        while isinstance(module, DyRepBlock):
            module = module.dense.conv
        held = {**self._held(), **assigned}
        if id(module.weight) not in held:
            raise ValueError("DyRep: the optimizer does not hold the weight of a conv to replace")
        weight_group = held[id(module.weight)]
        if module.bias is not None and id(module.bias) in held:
            return weight_group, held[id(module.bias)]
        return weight_group, self._vector_group(weight_group)

    def _replace(self, name: str, new: nn.Module, assigned: dict[int, int]) -> None:
        if self.group_of is None:
            weight_group, vector_group = self._origin_groups(
                self.model.get_submodule(name), assigned
            )
        self.model.set_submodule(name, new)
        for pname, p in new.named_parameters(prefix=name):
            if self.group_of is None:
                assigned[id(p)] = weight_group if p.dim() > 1 else vector_group
                continue
            group = self.group_of(pname, p)
            if not isinstance(group, int) or not 0 <= group < len(self.optimizer.param_groups):
                raise ValueError(
                    f"DyRep: group_of({pname!r}) returned {group!r}, not an index of the "
                    f"optimizer's {len(self.optimizer.param_groups)} groups"
                )
            assigned[id(p)] = group

    def _sync_optimizer(self, before: list[nn.Parameter], assigned: dict[int, int]) -> None:
        """Groups = the model's parameters (in ``named_parameters`` order) in their old or
        assigned group, then any non-model parameters the group held; removed ones dropped."""
        now = [p for _, p in self.model.named_parameters()]
        now_ids = {id(p) for p in now}
        before_ids = {id(p) for p in before}
        held = self._held()
        groups = self.optimizer.param_groups
        lists: list[list[nn.Parameter]] = [[] for _ in groups]
        for p in now:
            group = held.get(id(p), assigned.get(id(p)))
            if group is not None:
                lists[group].append(p)
        model_ids = before_ids | now_ids
        for i, g in enumerate(groups):
            lists[i] += [p for p in g["params"] if id(p) not in model_ids]
        for p in before:
            if id(p) not in now_ids:
                self.optimizer.state.pop(p, None)
        for g, params in zip(groups, lists, strict=True):
            g["params"] = params

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + self.adjustments)

    def adjust(
        self, batches: Iterable[Any] | None = None, *, epoch: int | None = None
    ) -> AdjustReport:
        """Grow the most salient candidate, cut weak branches, update the optimizer (see the
        class docstring).  ``batches`` (training batches, as for
        :func:`recalibrate_batchnorm`) re-estimate the new block's BatchNorms; ``None`` leaves
        their statistics at μ = 0, σ² = 1.  A collective under ``torch.distributed``."""
        names = list(self._candidates)
        check_same_on_all_ranks(repr(names) + self.metric, "the DyRep candidate convs")
        generator = self._generator()
        scores = self._reduced_scores(generator)
        finite = {n: s for n, s in scores.items() if math.isfinite(s)}
        before = list(self.model.parameters())
        assigned: dict[int, int] = {}
        grown = max(finite, key=finite.__getitem__) if finite else None
        if grown is not None:
            self._grow(grown, batches, generator, assigned)
        cut, collapsed = self._prune(assigned)
        report = AdjustReport(
            epoch=epoch,
            grown=grown,
            score=finite.get(grown) if grown is not None else None,
            scores=scores,
            cut=cut,
            collapsed=tuple(collapsed),
            changed=grown is not None or bool(cut),
        )
        if report.changed:
            self._sync_optimizer(before, assigned)
        self.adjustments += 1
        self.last_adjust_epoch = epoch
        self.history.append(report)
        self._refresh_candidates()
        if report.changed:
            for callback in self._callbacks:
                callback(report)
        return report

    def _grow(
        self,
        name: str,
        batches: Iterable[Any] | None,
        generator: torch.Generator,
        assigned: dict[int, int],
    ) -> None:
        conv = self._candidates[name]
        weight = conv.weight.detach().clone()
        bias = _conv_kernel_bias(conv)[1].detach().clone()
        block = DyRepBlock.grown_from(conv, generator=generator)
        block.train(conv.training)
        self._replace(name, block, assigned)
        self._collapsed.discard(name)
        if batches is not None:
            norms = [m for m in block.modules() if isinstance(m, nn.BatchNorm2d)]
            recalibrate_batchnorm(self.model, norms, batches)
            block.set_equivalent(weight, bias)

    def _prune(self, assigned: dict[int, int]) -> tuple[dict[str, tuple[str, ...]], list[str]]:
        cut: dict[str, tuple[str, ...]] = {}
        collapsed: list[str] = []
        blocks = [(n, m) for n, m in self.model.named_modules() if isinstance(m, DyRepBlock)]
        for name, block in blocks:
            try:
                if self.model.get_submodule(name) is not block:
                    continue
            except AttributeError:  # inside a block that collapsed above
                continue
            names = branches_to_cut(block.branch_ratios(), self.threshold, self.min_std)
            if names:
                cut[name] = names
                if self._cut_block(name, block, names, assigned):
                    collapsed.append(name)
        return cut, collapsed

    def _cut_block(
        self, name: str, block: DyRepBlock, names: tuple[str, ...], assigned: dict[int, int]
    ) -> bool:
        """Cut ``names`` from ``block``; True when only ``dense`` was left and the block became
        a plain conv with bias."""
        if set(names) != set(block.branches[1:]):
            block.remove_branches(names)
            return False
        conv = block.fused()
        conv.train(block.training)
        self._replace(name, conv, assigned)
        self._collapsed.add(name)
        return True

    def cut(self, name: str, branches: Iterable[str]) -> AdjustReport:
        """Cut ``branches`` from block ``name`` by hand, folding them into its K×K branch
        (exact in eval mode); a block left with ``dense`` only becomes a plain conv with bias.

        The pruning rule of :meth:`adjust` never cuts every branch of a block (not all of its
        ratios can lie below their mean), so only this method collapses blocks.  The optimizer
        is updated, the running scores are cleared and the ``on_change`` callbacks are called,
        as after an adjustment.  Call it on every rank alike under ``torch.distributed``.

        Raises:
            ValueError: ``name`` is not a block, or ``branches`` are not active branches of it.
        """
        try:
            block = self.model.get_submodule(name) if name else None
        except AttributeError:
            block = None
        if not isinstance(block, DyRepBlock):
            raise ValueError(f"DyRep.cut: {name!r} is not a DyRepBlock of the model")
        names = tuple(branches)
        bad = [n for n in names if n == "dense" or n not in block.branches]
        if bad or not names:
            raise ValueError(
                f"DyRep.cut: cannot cut {list(names)} from {name!r}; its removable branches "
                f"are {block.branches[1:]}"
            )
        before = list(self.model.parameters())
        assigned: dict[int, int] = {}
        collapsed = self._cut_block(name, block, names, assigned)
        self._sync_optimizer(before, assigned)
        report = AdjustReport(
            epoch=None,
            grown=None,
            score=None,
            scores={},
            cut={name: names},
            collapsed=(name,) if collapsed else (),
            changed=True,
        )
        self.history.append(report)
        self._refresh_candidates()
        for callback in self._callbacks:
            callback(report)
        return report

    # ---- structure and deployment --------------------------------------------------------
    def structure(self) -> list[tuple[str, str, tuple[str, ...]]]:
        """The changes made to the plain model, outer first: ``(path, "block", branches)`` for
        each block and ``(path, "conv", ())`` for each collapsed block (a plain conv with bias
        now)."""
        out: list[tuple[str, str, tuple[str, ...]]] = []
        for name, module in self.model.named_modules():
            if isinstance(module, DyRepBlock):
                out.append((name, "block", module.branches))
            elif name in self._collapsed and type(module) is nn.Conv2d:
                out.append((name, "conv", ()))
        return out

    def fuse(self, *, fold_batchnorm: bool = False) -> nn.Module:
        """A fused copy of the model (see :func:`fuse_dyrep`)."""
        return fuse_dyrep(self.model, fold_batchnorm=fold_batchnorm)

    # ---- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Settings, structure, running scores (by candidate name), adjustment count, history."""
        scores = None
        if self._sums is not None:
            scores = {
                "names": list(self._candidates),
                "sums": self._sums.detach().cpu().clone(),
                "counts": self._counts.detach().cpu().clone(),
            }
        return {
            "settings": {
                "interval": self.interval,
                "max_adjust": self.max_adjust,
                "metric": self.metric,
                "threshold": self.threshold,
                "min_std": self.min_std,
                "seed": self.seed,
            },
            "structure": [[p, k, list(b)] for p, k, b in self.structure()],
            "scores": scores,
            "adjustments": self.adjustments,
            "last_adjust_epoch": self.last_adjust_epoch,
            "history": [asdict(r) for r in self.history],
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`: rebuild the saved structure on the plain model (fresh
        parameters, to be overwritten by a strict ``model.load_state_dict``), update the
        optimizer's groups as an adjustment does, restore scores and counters.

        Raises:
            ValueError: missing keys; this DyRep already changed the model into another
                structure; a saved path that is not a conv of the model; saved scores for
                convs that are not candidates after the rebuild.
        """
        super().load_state_dict(state_dict)
        where = "DyRep.load_state_dict"
        missing = {"settings", "structure", "adjustments"} - set(state_dict)
        if missing:
            raise ValueError(f"{where}: missing keys {sorted(missing)}")
        settings = dict(state_dict["settings"])
        metric = settings.get("metric", self.metric)
        if metric not in DYREP_METRICS:
            raise ValueError(f"{where}: unknown metric {metric!r}")
        structure = [(str(p), str(k), tuple(b)) for p, k, b in state_dict["structure"]]
        current = self.structure()
        rebuilt = False
        if structure != current:
            if current:
                raise ValueError(
                    f"{where}: this DyRep already changed the model ({current[:3]}...); load "
                    "into the plain model it was constructed on"
                )
            self._rebuild(structure, where)
            rebuilt = True
        self.interval = _check_int(settings.get("interval", self.interval), "interval", 1)
        self.max_adjust = _check_int(settings.get("max_adjust", self.max_adjust), "max_adjust", 0)
        self.metric = metric
        self.threshold = _check_real(settings.get("threshold", self.threshold), "threshold")
        self.min_std = _check_real(settings.get("min_std", self.min_std), "min_std")
        self.seed = _check_int(settings.get("seed", self.seed), "seed", 0)
        self.adjustments = _check_int(state_dict["adjustments"], "adjustments", 0)
        self.last_adjust_epoch = state_dict.get("last_adjust_epoch")
        self.history = [
            AdjustReport(**{**r, "cut": {k: tuple(v) for k, v in r["cut"].items()},
                            "collapsed": tuple(r["collapsed"])})
            for r in state_dict.get("history", [])
        ]  # fmt: skip
        self._refresh_candidates()
        scores = state_dict.get("scores")
        if scores is not None:
            if list(scores["names"]) != list(self._candidates):
                raise ValueError(
                    f"{where}: saved scores are for convs {list(scores['names'])[:5]}..., the "
                    f"model's candidates are {list(self._candidates)[:5]}..."
                )
            device = next(iter(self._candidates.values())).weight.device
            self._sums = torch.as_tensor(scores["sums"], dtype=torch.float64).to(device)
            self._counts = torch.as_tensor(scores["counts"], dtype=torch.int64).to(device)
        if rebuilt:
            report = AdjustReport(epoch=self.last_adjust_epoch, grown=None, score=None,
                                  scores={}, changed=True)  # fmt: skip
            for callback in self._callbacks:
                callback(report)

    def _rebuild(self, structure: list[tuple[str, str, tuple[str, ...]]], where: str) -> None:
        before = list(self.model.parameters())
        assigned: dict[int, int] = {}
        for path, kind, branches in structure:
            try:
                conv = self.model.get_submodule(path) if path else None
            except AttributeError:
                conv = None
            if type(conv) is not nn.Conv2d:
                raise ValueError(
                    f"{where}: the saved structure changes {path!r}, which is not a plain "
                    "nn.Conv2d of this model (a different model, or not the plain one?)"
                )
            if kind not in ("block", "conv"):
                raise ValueError(f"{where}: unknown structure entry {kind!r} at {path!r}")
            if kind == "block":
                new: nn.Module = DyRepBlock._in_place_of(conv, branches)
            else:
                with torch.random.fork_rng(devices=[]):
                    new = nn.Conv2d(
                        conv.in_channels,
                        conv.out_channels,
                        conv.kernel_size,
                        conv.stride,
                        conv.padding,
                        groups=conv.groups,
                        bias=True,
                        padding_mode=conv.padding_mode,
                    )
                new = new.to(device=conv.weight.device, dtype=conv.weight.dtype)
                self._collapsed.add(path)
            new.train(conv.training)
            self._replace(path, new, assigned)
        self._sync_optimizer(before, assigned)

    def __repr__(self) -> str:
        blocks = sum(1 for _, k, _ in self.structure() if k == "block")
        return (
            f"DyRep(candidates={len(self._candidates)}, blocks={blocks}, "
            f"interval={self.interval}, max_adjust={self.max_adjust}, metric={self.metric!r}, "
            f"adjustments={self.adjustments})"
        )
