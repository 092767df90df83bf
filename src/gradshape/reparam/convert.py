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
from collections.abc import Callable, Container, Iterator, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

import torch
import torch.fx
from torch import nn
from torch.overrides import TorchFunctionMode

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
    "selected_convs",
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


def selected_convs(
    modules: Mapping[str, nn.Module],
    include: Callable[[str, nn.Module], bool] | None,
    exclude: Callable[[str, nn.Module], bool] | None,
    skipped: list[tuple[str, str]],
) -> Iterator[tuple[str, nn.modules.conv._ConvNd]]:
    """The convolutions of ``modules`` (name → module) that ``include`` selects (``None``:
    all), in order; those ``exclude`` matches are appended to ``skipped`` as
    ``(name, "excluded")`` instead.  ``include`` and ``exclude`` are predicates
    ``(name, module) -> bool`` as :func:`gradshape.selection.layer_predicate` makes them."""
    for name, module in modules.items():
        if not isinstance(module, nn.modules.conv._ConvNd):
            continue
        if include is not None and not include(name, module):
            continue
        if exclude is not None and exclude(name, module):
            skipped.append((name, "excluded"))
            continue
        yield name, module


def following_batchnorms(model: nn.Module, example_inputs: Any = None) -> dict[str, str]:
    """Conv name → name of the ``nn.BatchNorm2d`` that directly follows it.

    With ``example_inputs`` (a tensor, a tuple of positional inputs or a dict of keyword
    inputs), one eval-mode forward under ``torch.no_grad()`` decides instead of tracing: a
    BatchNorm directly follows a conv when every output of the conv is used once, by that
    BatchNorm, and the BatchNorm is called on nothing else.  This works on models torch.fx
    cannot trace (padding computed from the input's shape, as Hugging Face's MobileNets do),
    for the path that input takes.

    "Directly follows" means: in the ``torch.fx`` graph of the smallest module enclosing the
    conv that decides it, each call of the conv feeds that BatchNorm and nothing else, and the
    BatchNorm is called on nothing else (so ``self.bn1(self.conv1(x))`` in a ResNet block
    counts; both are called once there).  The search starts at the conv's parent and moves up
    one module at a time while the conv is not called in the module traced or its output
    leaves it (it is what the module returns), so a model whose own ``forward`` cannot be
    traced (data-dependent control flow, as in most ``transformers`` models) still pairs the
    convs inside its traceable submodules.  Every enclosing module above that can be traced
    must agree (no call of the conv elsewhere that the BatchNorm does not follow); the
    search stops at the first one that cannot be traced.  Inside a traced module, a child that
    cannot be traced is kept as one opaque call.

    Convs for which this cannot be known (an enclosing module on the way up cannot be traced,
    or the output goes into a module that cannot) are left out, as are convs no BatchNorm2d
    directly follows; :func:`convert` reports which is which.
    """
    if example_inputs is not None:
        return _observed_followers(model, example_inputs)[0]
    finder = _BatchNormFinder(model)
    pairs = {}
    for name, module in finder.modules.items():
        if isinstance(module, nn.Conv2d):
            bn_name, _ = finder.follower(name)
            if bn_name is not None:
                pairs[name] = bn_name
    return pairs


class _Uses(TorchFunctionMode):
    """Counts, for watched tensors, how many torch calls compute a tensor from them (queries
    such as ``x.dim()`` or ``x.shape`` are not uses)."""

    def __init__(self) -> None:
        super().__init__()
        self.watched: dict[int, tuple[torch.Tensor, str]] = {}
        self.uses: Counter[int] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        results = out if isinstance(out, (tuple, list)) else (out,)
        if any(isinstance(r, torch.Tensor) for r in results):
            for value in itertools.chain(args, kwargs.values()):
                entry = self.watched.get(id(value))
                if entry is not None and entry[0] is value:
                    self.uses[id(value)] += 1
        return out


def _observed_followers(model: nn.Module, example_inputs: Any) -> tuple[dict[str, str], set[str]]:
    """The pairs one forward of ``example_inputs`` shows, and the convs it called."""
    names = {id(m): n for n, m in model.named_modules()}
    uses = _Uses()
    outputs: dict[str, list[int]] = {}  # conv -> ids of its outputs
    fed: dict[str, list[str | None]] = {}  # BatchNorm -> the conv that produced each input

    def conv_done(module, _args, output):
        name = names[id(module)]
        outputs.setdefault(name, []).append(id(output))
        uses.watched[id(output)] = (output, name)

    def bn_called(module, args):
        entry = uses.watched.get(id(args[0])) if args else None
        source = entry[1] if entry is not None and entry[0] is args[0] else None
        fed.setdefault(names[id(module)], []).append(source)

    handles = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(conv_done))
        elif isinstance(module, nn.BatchNorm2d):
            handles.append(module.register_forward_pre_hook(bn_called))
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad(), uses:
            if isinstance(example_inputs, Mapping):
                model(**example_inputs)
            elif isinstance(example_inputs, tuple):
                model(*example_inputs)
            else:
                model(example_inputs)
    finally:
        for h in handles:
            h.remove()
        for m, training in flags:
            m.training = training
    pairs = {}
    for bn_name, sources in fed.items():
        conv = sources[0]
        if conv is None or any(s != conv for s in sources):
            continue
        if len(outputs[conv]) == len(sources) and all(uses.uses[i] == 1 for i in outputs[conv]):
            pairs[conv] = bn_name
    return pairs, set(outputs)


class _Tracer(torch.fx.Tracer):
    """Keeps every Conv2d and BatchNorm2d (subclasses too) as one call node, and the modules
    whose ids are in ``opaque`` (found untraceable) as calls it does not look into."""

    def __init__(self, opaque: Container[int]) -> None:
        super().__init__()
        self.opaque = opaque

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (
            isinstance(m, (nn.Conv2d, nn.BatchNorm2d))
            or id(m) in self.opaque
            or super().is_leaf_module(m, module_qualified_name)
        )


def _short_error(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    text = f"{type(err).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text if len(text) <= 160 else text[:157] + "..."


_UNKNOWN = "cannot tell whether a BatchNorm2d follows it: "
_AFTER_SUM = "; use bn='after_sum' to convert it without absorbing a BatchNorm"


class _BatchNormFinder:
    """Traces a model's modules on demand, bottom-up, each once (see following_batchnorms)."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = dict(model.named_modules())
        self._traces: dict[str, torch.fx.Graph | str | None] = {}
        self._calls: dict[str, dict[int, list[torch.fx.Node]]] = {}  # name → id → call nodes
        self._opaque: dict[int, tuple[str, str]] = {}  # id → (name, why fx cannot trace it)

    def _trace(self, name: str) -> torch.fx.Graph | str | None:
        """The fx graph of module ``name``, why it cannot be traced, or None for a container
        without ``forward`` (ModuleList, ModuleDict).  Its descendants are traced first, so
        that the untraceable ones become opaque calls."""
        if name in self._traces:
            return self._traces[name]
        module = self.modules[name]
        probe = _Tracer(self._opaque)
        prefix = f"{name}." if name else ""
        for child_name, child in module.named_children():
            full = prefix + child_name
            container = type(child).forward is nn.Module.forward
            if full in self.modules and (container or not probe.is_leaf_module(child, full)):
                reason = self._trace(full)
                if isinstance(reason, str):
                    self._opaque[id(child)] = (full, reason)
        if type(module).forward is nn.Module.forward:
            result: torch.fx.Graph | str | None = None
        else:
            try:
                result = _Tracer(self._opaque).trace(module)
            except Exception as err:  # fx raises many kinds of errors on untraceable Python
                result = _short_error(err)
        self._traces[name] = result
        return result

    def _calls_of(self, name: str, graph: torch.fx.Graph, module: nn.Module) -> list[torch.fx.Node]:
        """The call nodes of ``module`` in the graph of module ``name``."""
        if name not in self._calls:
            root, index = self.modules[name], {}
            for node in graph.nodes:
                if node.op == "call_module":
                    index.setdefault(id(root.get_submodule(node.target)), []).append(node)
            self._calls[name] = index
        return self._calls[name].get(id(module), [])

    def follower(self, conv_name: str) -> tuple[str | None, str]:
        """``(bn_name, "")`` when a BatchNorm2d directly follows the conv, ``(None, "")`` when
        none does, ``(None, reason)`` when it cannot be known."""
        conv = self.modules[conv_name]
        parts = conv_name.split(".") if conv_name else []
        found: tuple[str, nn.Module] | None = None
        for depth in range(len(parts) - 1, -1, -1):
            name = ".".join(parts[:depth])
            graph = self._trace(name)
            if graph is None:
                continue
            where = repr(name) if name else "the model itself"
            if isinstance(graph, str):
                if found is not None:  # decided below; the modules above cannot be checked
                    break
                return None, f"{_UNKNOWN}torch.fx cannot trace {where} ({graph}){_AFTER_SUM}"
            module = self.modules[name]
            nodes = self._calls_of(name, graph, conv)
            if found is not None:  # every module above that can be traced must agree
                if not _feeds_only(nodes, self._calls_of(name, graph, found[1])):
                    return None, ""
                continue
            if not nodes:
                continue  # not called here: maybe by a module further up
            users = [list(n.users) for n in nodes]
            if len(nodes) == 1 and len(users[0]) == 1 and users[0][0].op == "output":
                continue  # the module returns it: what follows is decided further up
            if len(users[0]) != 1 or users[0][0].op != "call_module":
                return None, ""
            target = module.get_submodule(users[0][0].target)
            if id(target) in self._opaque:
                opaque, why = self._opaque[id(target)]
                return None, (
                    f"{_UNKNOWN}its output goes into {opaque!r}, which torch.fx cannot trace "
                    f"({why}){_AFTER_SUM}"
                )
            if not isinstance(target, nn.BatchNorm2d) or not _feeds_only(
                nodes, self._calls_of(name, graph, target)
            ):
                return None, ""
            found = ((f"{name}." if name else "") + users[0][0].target, target)
        return (found[0], "") if found is not None else (None, "")


def _feeds_only(convs: list[torch.fx.Node], bns: list[torch.fx.Node]) -> bool:
    """Whether each call of a conv (``convs``, nodes of one graph) feeds one call of a
    BatchNorm (``bns``) and nothing else, and the BatchNorm is called on nothing else."""
    if len(convs) != len(bns):
        return False
    for conv in convs:
        users = list(conv.users)
        if len(users) != 1 or users[0] not in bns or users[0].args != (conv,) or users[0].kwargs:
            return False
    return True


def _batchnorm_obstacle(conv: nn.Conv2d, bn: nn.Module | None) -> str:
    if bn is None:
        return (
            "no BatchNorm2d directly follows it, so bn='per_branch' would add normalisation the "
            "model does not have: use bn='after_sum'"
        )
    if type(bn).forward is not nn.BatchNorm2d.forward:
        return (
            f"the BatchNorm2d after it ({type(bn).__name__}) overrides forward, so folding its "
            "running statistics may not reproduce it: use bn='after_sum'"
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
    example_inputs: Any = None,
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
            BatchNorm, or where torch.fx cannot tell (the reason says which module it cannot
            trace), is skipped.  ``"after_sum"`` (Lemma 1's form): the branches are plain
            convs and any BatchNorm after the conv stays, now after the sum; it needs no
            tracing.
        init: ``"preserve"`` (the converted model computes what the original did; see
            :meth:`ReparamBlock.from_conv`) or ``"fresh"`` (default initialisation, as the
            papers train from scratch).
        inplace: modify ``model`` itself.
        include, exclude: module names, fnmatch patterns, or a predicate ``(name, module)``.
        example_inputs: with ``bn="per_branch"``, inputs for one eval-mode forward that finds
            the BatchNorm after each conv by observing it (see :func:`following_batchnorms`)
            instead of tracing; give it for models torch.fx cannot trace.

    Returns:
        ``Conversion(model, converted, skipped)``: the converted model, the names of the
        converted convs, and ``(name, reason)`` for every conv left as it was.  Skipped for a
        reason (also issued as one ``UserWarning``): transposed, 1-D/3-D or lazy convs, conv
        subclasses that override ``forward`` or ``_conv_forward``
        (:func:`gradshape.selection.forward_override`; a subclass that only adds a
        constructor converts), frozen weights (``requires_grad=False``: the block's new
        branches would train), even kernels, 1×1 kernels, dilation != 1, parametrized
        weights, a module shared under several names, convs already inside a block, and (per
        branch) convs without a foldable BatchNorm after them or where that cannot be known.
        ``exclude``d convs are listed without a warning.

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
    finder = None
    observed: tuple[dict[str, str], set[str]] | None = None
    if bn == "per_branch":
        if example_inputs is None:
            finder = _BatchNormFinder(work)
        else:
            observed = _observed_followers(work, example_inputs)
    modules = dict(work.named_modules())
    uses = Counter(id(m) for _, m in work.named_modules(remove_duplicate=False))
    blocks = [n for n, m in modules.items() if isinstance(m, ReparamBlock)]

    plan: list[tuple[str, str | None]] = []
    skipped: list[tuple[str, str]] = []
    for name, module in selected_convs(modules, inc, exc, skipped):
        bn_name = None
        if any(name.startswith(f"{b}.") for b in blocks):
            reason = "already inside a reparameterization block"
        else:
            reason = conversion_obstacle(module)
        if not reason and uses[id(module)] > 1:
            reason = "the same module is used under several names"
        if not reason and finder is not None:
            bn_name, reason = finder.follower(name)
            reason = reason or _batchnorm_obstacle(module, modules.get(bn_name))
        elif not reason and observed is not None:
            bn_name = observed[0].get(name)
            reason = (
                _batchnorm_obstacle(module, modules.get(bn_name))
                if name in observed[1]
                else f"{_UNKNOWN}the forward of example_inputs did not call it{_AFTER_SUM}"
            )
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
    # a block nested in another (DyRep grows inside blocks) is folded by the outer one
    outer = [(n, m) for n, m in blocks if not any(n.startswith(f"{o}.") for o, _ in blocks)]
    for name, block in outer:
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
