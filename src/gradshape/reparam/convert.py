"""Swap a model's convolutions for training-time blocks, and fuse the blocks back.

* :func:`convert`: every eligible ``nn.Conv2d`` → an ACB, RepVGG or DBB block.
* :func:`fuse`: every block → one plain ``nn.Conv2d`` (with bias) equal to it in eval mode.
* :func:`max_output_difference`: the check that a fusion (or anything else) kept the function.
"""

from __future__ import annotations

import copy
import itertools
import warnings
from collections import Counter
from collections.abc import Mapping
from types import MappingProxyType
from typing import NamedTuple

import torch
import torch.fx
from torch import nn

from ..selection import LayerSelector, layer_predicate
from .blocks import (
    BN_MODES,
    INITS,
    ACBlock,
    DiverseBranchBlock,
    ReparamBlock,
    RepVGGBlock,
    conversion_obstacle,
)

__all__ = [
    "KINDS",
    "Conversion",
    "convert",
    "following_batchnorms",
    "fuse",
    "max_output_difference",
]

#: The block each ``kind`` of :func:`convert` builds.
KINDS: Mapping[str, type[ReparamBlock]] = MappingProxyType(
    {"acb": ACBlock, "repvgg": RepVGGBlock, "dbb": DiverseBranchBlock}
)


class Conversion(NamedTuple):
    """What :func:`convert` did: the model to train, and which convs it converted or left."""

    model: nn.Module
    converted: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...]


def following_batchnorms(model: nn.Module) -> dict[str, str]:
    """Conv name → name of the ``nn.BatchNorm2d`` that directly follows it.

    "Directly follows" means: in the ``torch.fx`` graph of ``model``, the conv's output feeds
    that BatchNorm and nothing else, and each of the two modules is called exactly once (so
    ``self.bn1(self.conv1(x))`` in a ResNet block counts).  Where the model cannot be traced
    symbolically (data-dependent control flow), the rule falls back to adjacent children of
    an ``nn.Sequential``: a Conv2d whose next sibling is a BatchNorm2d.
    """
    modules = dict(model.named_modules())
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # fx raises many kinds of errors on untraceable Python; fall back
        return _sequential_pairs(model)
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs = {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.Conv2d):
            continue
        if len(node.users) != 1:
            continue
        (user,) = node.users
        if (
            user.op == "call_module"
            and isinstance(modules.get(user.target), nn.BatchNorm2d)
            and user.args == (node,)
            and not user.kwargs
            and calls[node.target] == 1
            and calls[user.target] == 1
        ):
            pairs[node.target] = user.target
    return pairs


def _sequential_pairs(model: nn.Module) -> dict[str, str]:
    pairs = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for (a, first), (b, second) in itertools.pairwise(children):
            if isinstance(first, nn.Conv2d) and isinstance(second, nn.BatchNorm2d):
                prefix = f"{name}." if name else ""
                pairs[prefix + a] = prefix + b
    return pairs


def _batchnorm_obstacle(conv: nn.Conv2d, bn: nn.Module | None) -> str:
    if bn is None:
        return (
            "no BatchNorm2d directly follows it, so bn='per_branch' would add normalisation the "
            "model does not have: use bn='after_sum'"
        )
    if bn.running_mean is None:
        return "the BatchNorm2d after it has track_running_stats=False: it cannot be fused"
    if bn.num_features != conv.out_channels:
        return "the BatchNorm2d after it does not match its output channels"
    return ""


def convert(
    model: nn.Module,
    kind: str,
    *,
    bn: str = "per_branch",
    init: str = "preserve",
    inplace: bool = False,
    include: LayerSelector = None,
    exclude: LayerSelector = None,
) -> Conversion:
    """Replace every eligible ``nn.Conv2d`` by a training-time multi-branch block.

    Args:
        model: the network.  Unless ``inplace``, a deep copy is converted (like timm's
            ``reparameterize_model``); always train the returned ``Conversion.model`` and
            build the optimizer after converting.
        kind: ``"acb"`` (:class:`ACBlock`), ``"repvgg"`` (:class:`RepVGGBlock`) or ``"dbb"``
            (:class:`DiverseBranchBlock`).
        bn: ``"per_branch"`` (the papers' form): the block absorbs the ``nn.BatchNorm2d`` that
            directly follows the conv (see :func:`following_batchnorms`; its old place becomes
            ``nn.Identity``), and each branch ends in its own BatchNorm; a conv with no such
            BatchNorm is skipped.  ``"after_sum"`` (Lemma 1's form): the branches are plain
            convs and any BatchNorm after the conv stays, now after the sum.
        init: ``"preserve"`` (the converted model computes what the original did; see
            :meth:`ReparamBlock.from_conv`) or ``"fresh"`` (default initialisation, as the
            papers train from scratch).
        inplace: modify ``model`` itself.
        include, exclude: module names, fnmatch patterns, or a predicate ``(name, module)``.

    Returns:
        ``Conversion(model, converted, skipped)``: the converted model, the names of the
        converted convs, and ``(name, reason)`` for every conv left as it was.  Skipped for a
        reason (also issued as one ``UserWarning``): transposed, 1-D/3-D, lazy or subclassed
        convs, even kernels, 1×1 kernels, dilation != 1, parametrized weights, a module shared
        under several names, convs already inside a block, and (per branch) convs without a
        foldable BatchNorm after them.  ``exclude``d convs are listed without a warning.

    Any odd kernel (also non-square), stride, padding ``>= 0``, padding mode, groups
    (depthwise included) and bias are converted exactly; :func:`fuse` folds the result back.

    How closely SGS with ``G = gs.branch_scaling(kind, K)`` follows each form is measured in
    the :mod:`gradshape.reparam` module docstring (exact after the sum for ACB; per-branch
    BatchNorm drifts away).

    Example::

        net = gs.reparam.convert(net, "acb").model      # train this
        deploy = gs.reparam.fuse(net)                   # infer with this
        assert gs.reparam.max_output_difference(net, deploy, x) < 1e-4
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be a torch.nn.Module, got {type(model).__name__}")
    if kind not in KINDS:
        raise ValueError(f"convert: unknown kind {kind!r}; expected one of {sorted(KINDS)}")
    if bn not in BN_MODES:
        raise ValueError(f"convert: bn must be one of {BN_MODES}, got {bn!r}")
    if init not in INITS:
        raise ValueError(f"convert: init must be one of {INITS}, got {init!r}")
    inc, exc = layer_predicate(include, "include"), layer_predicate(exclude, "exclude")
    work = model if inplace else copy.deepcopy(model)
    pairs = following_batchnorms(work) if bn == "per_branch" else {}
    modules = dict(work.named_modules())
    uses = Counter(id(m) for _, m in work.named_modules(remove_duplicate=False))
    blocks = [n for n, m in modules.items() if isinstance(m, ReparamBlock)]

    plan: list[tuple[str, str | None]] = []
    skipped: list[tuple[str, str]] = []
    for name, module in modules.items():
        if not isinstance(module, nn.modules.conv._ConvNd):
            continue
        if inc is not None and not inc(name, module):
            continue
        if exc is not None and exc(name, module):
            skipped.append((name, "excluded"))
            continue
        bn_name = pairs.get(name)
        if any(name.startswith(f"{b}.") for b in blocks):
            reason = "already inside a reparameterization block"
        else:
            reason = conversion_obstacle(module)
        if not reason and uses[id(module)] > 1:
            reason = "the same module is used under several names"
        if not reason and bn == "per_branch":
            reason = _batchnorm_obstacle(module, modules.get(bn_name))
        if reason:
            skipped.append((name, reason))
        else:
            plan.append((name, bn_name))

    for name, bn_name in plan:
        norm = modules[bn_name] if bn_name is not None else None
        block = KINDS[kind].from_conv(modules[name], norm, mode=bn, init=init)
        if name:
            work.set_submodule(name, block)
        else:
            work = block
        if bn_name is not None:
            work.set_submodule(bn_name, nn.Identity())

    reported = [(n, r) for n, r in skipped if r != "excluded"]
    if reported:
        listing = "; ".join(f"{n or '<model>'}: {r}" for n, r in reported)
        warnings.warn(
            f"convert({kind!r}) left {len(reported)} conv(s) as they were: {listing}",
            UserWarning,
            stacklevel=2,
        )
    return Conversion(work, tuple(n for n, _ in plan), tuple(skipped))


def fuse(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Replace every :class:`ReparamBlock` by one plain ``nn.Conv2d`` with bias.

    The result equals the training-time model in eval mode up to float round-off (relative
    ~1e-6 in float32).  A per-branch block's BatchNorms are folded into the conv; after the sum
    the BatchNorm that follows stays a BatchNorm.  Unless ``inplace``, a deep copy is fused.
    A model without blocks is returned as it is (no copy); a model that is itself a block is
    returned as its fused conv.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse: model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, ReparamBlock):
        return model.fused()
    if not any(isinstance(m, ReparamBlock) for m in model.modules()):
        return model
    work = model if inplace else copy.deepcopy(model)
    blocks = [(n, m) for n, m in work.named_modules() if isinstance(m, ReparamBlock)]
    for name, block in blocks:
        work.set_submodule(name, block.fused())
    return work


def max_output_difference(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    """``max |a(x) − b(x)|`` with both models in eval mode under ``torch.no_grad()``.

    Every submodule's training flag is restored afterwards.  Both outputs must be tensors of
    the same shape.
    """
    for label, m in (("a", a), ("b", b)):
        if not isinstance(m, nn.Module):
            raise TypeError(f"max_output_difference: {label} must be an nn.Module")
    flags = [(m, m.training) for net in (a, b) for m in net.modules()]
    try:
        a.eval()
        b.eval()
        with torch.no_grad():
            ya, yb = a(x), b(x)
    finally:
        for m, training in flags:
            m.training = training
    if not isinstance(ya, torch.Tensor) or not isinstance(yb, torch.Tensor):
        raise TypeError("max_output_difference: both models must return a tensor")
    if ya.shape != yb.shape:
        raise ValueError(
            f"max_output_difference: output shapes differ: {tuple(ya.shape)} vs {tuple(yb.shape)}"
        )
    if ya.numel() == 0:
        return 0.0
    return float((ya - yb).abs().max())
