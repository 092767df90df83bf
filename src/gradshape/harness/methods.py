"""Training methods by name: a registry of capability records, and the builder of a method spec.

A *method spec* names one method or a combination, optionally followed by setting overrides:

    baseline        sgs        sgs+cdg        sgs+pgt        sgs@k=3        grid@alpha=2@beta=4

Parts joined by ``+`` are built in a fixed pipeline: the structural conversion (at most one)
first, then the optimizer on the (converted) model, then the gradient transforms and the loss
transform in the order written, composed with :func:`gradshape.compose` (so ``sgs+cdg`` scales
by G first and then smooths across output channels).  Each ``@key=value`` replaces one method
setting of the :class:`~gradshape.harness.config.RunConfig` (``key`` is ``section.field``,
or a field name found in one method section only: ``k`` means ``sgs.k``).

Each :class:`MethodInfo` carries flags (``needs_refresh``, ``structural``, ``loss_transform``,
``param_transform``, ``uses_k``, ``reports_scalings``, ``changes_parameters``, ``search``): the
harness, the CLI and the tests read these flags and never branch on method names.  At most one
part of each ``group`` may appear in a combination (two structural kinds, or ``sgs`` with
``grid`` — both a :class:`~gradshape.SpatialGradientScaling` on the same weights — do not
compose).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from .. import reparam
from ..batches import SampledBatches
from ..channel import ChannelDirectedGradients
from ..powergrad import PowerGrad
from ..scaling import branch_scaling, grid_scaling
from ..spatial import RefreshSchedule, SpatialGradientScaling
from ..transform import GradientTransform, compose
from .checkpoint import load_checkpoint, save_checkpoint
from .config import RunConfig, apply_override

__all__ = [
    "METHODS",
    "MethodInfo",
    "MethodState",
    "SearchStage",
    "build_method",
    "parse_method",
    "resolve_method",
]

#: ``(epoch, train_loader) -> bool``: run at the start of every epoch; True if it did work.
EpochHook = Callable[[int, Iterable[Any]], bool]
#: ``(scaler) -> None``: run every step after ``backward()`` and before ``optimizer.step()``.
StepHook = Callable[[torch.amp.GradScaler], None]
#: ``(epoch, train_loader) -> bool``: run after every epoch's training pass; True when the
#: model's parameters changed (the harness then re-wraps DistributedDataParallel).
EpochEndHook = Callable[[int, Iterable[Any]], bool]
#: ``(run folder, writes files) -> entries``: run when training ends; the entries join the run
#: record (only the rank that writes files may write beside the run).
RecordHook = Callable[[Path, bool], dict[str, Any]]


class _Build:
    """What the part builders share while one method is built.

    Structural parts replace :attr:`model` before anything else; the optimizer is created from
    the model on first use, so gradient transforms in ``mode="update"`` can attach to it.
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: RunConfig,
        make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    ) -> None:
        self.model = model
        self.cfg = cfg
        self._make_optimizer = make_optimizer
        self._optimizer: torch.optim.Optimizer | None = None
        self.deploy: Callable[[nn.Module], nn.Module] = _identity
        self.loss: nn.Module | None = None
        self.transforms: dict[str, GradientTransform] = {}
        self.hooks: list[EpochHook] = []
        self.step_hooks: list[StepHook] = []
        self.end_hooks: list[EpochEndHook] = []
        self.record_hooks: list[RecordHook] = []
        self.scaling: SpatialGradientScaling | None = None

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        if self._optimizer is None:
            self._optimizer = self._make_optimizer(self.model)
        return self._optimizer


@dataclass(frozen=True)
class SearchStage:
    """A run that must precede a method's own (RepOptimizers' hyper-search).

    Attributes:
        method: the method spec of the search run (trained in ``<run folder>/search``).
        output: the file the search run writes beside its record.
        config_key: the ``section.field`` that receives the path of ``output``; when the
            config already names a file there, the search is skipped.
        epochs_key: the ``section.field`` holding the search run's epochs (0: half the run's).
    """

    method: str
    output: str
    config_key: str
    epochs_key: str


@dataclass(frozen=True)
class MethodInfo:
    """A registered method part and what it needs from the harness.

    Attributes:
        name: the name used in specs.
        description: one line for ``--help`` and error messages.
        group: combinations hold at most one part per group.
        build: adds the part to a build in progress (see :func:`build_method`).
        needs_refresh: recomputes G from data during training (an epoch hook).
        structural: changes the model's structure; the harness fuses it back for evaluation.
        loss_transform: supplies the loss function.
        param_transform: transforms gradients (or steps) of model parameters.
        uses_k: reads ``sgs.k``; ``--k 1,3,5`` expands it into one method per k.
        reports_scalings: holds a per-layer G that results record (a SpatialGradientScaling).
        section: the config section holding this part's settings (``None``: none).
        fixed: settings this part forces, ``(key, value)`` as in a ``@key=value`` override.
        changes_parameters: adds and removes model parameters while training (DyRep); no
            parameter transform composes with it.
        search: a run to train first (see :class:`SearchStage`).
    """

    name: str
    description: str
    group: str
    build: Callable[[_Build], None] = field(repr=False)
    needs_refresh: bool = False
    structural: bool = False
    loss_transform: bool = False
    param_transform: bool = False
    uses_k: bool = False
    reports_scalings: bool = False
    section: str | None = None
    fixed: tuple[tuple[str, str], ...] = ()
    changes_parameters: bool = False
    search: SearchStage | None = None


@dataclass
class MethodState:
    """A built method: everything the training loop uses.

    Attributes:
        spec: the method spec it was built from.
        parts: the registry records of its parts, in the order written.
        model: the model to train (converted for structural methods).
        optimizer: the optimizer over ``model``'s parameters.
        loss_fn: ``(logits, target) -> loss``.
        transforms: part name -> transform whose ``state_dict`` goes into checkpoints.
        epoch_hooks: called as ``hook(epoch, train_loader)`` at the start of each epoch.
        scaling: the SpatialGradientScaling whose G results report, if any.
        deploy: ``model -> inference model`` (fusion for structural methods, else identity).
        step_hooks: called as ``hook(scaler)`` after ``backward()``, before the step.
        epoch_end_hooks: called as ``hook(epoch, train_loader)`` after each training pass;
            True when the model's parameters changed.
        record_hooks: called as ``hook(run_folder, writes_files)`` when training ends; their
            entries join the run record.
    """

    spec: str
    parts: tuple[MethodInfo, ...]
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: nn.Module
    transforms: dict[str, GradientTransform]
    epoch_hooks: list[EpochHook]
    scaling: SpatialGradientScaling | None
    deploy: Callable[[nn.Module], nn.Module]
    step_hooks: list[StepHook] = field(default_factory=list)
    epoch_end_hooks: list[EpochEndHook] = field(default_factory=list)
    record_hooks: list[RecordHook] = field(default_factory=list)

    def _flag(self, name: str) -> bool:
        return any(getattr(p, name) for p in self.parts)

    @property
    def needs_refresh(self) -> bool:
        return self._flag("needs_refresh")

    @property
    def structural(self) -> bool:
        return self._flag("structural")

    def state_dict(self) -> dict[str, Any]:
        """Each transform's state, by part name."""
        return {name: t.state_dict() for name, t in self.transforms.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if set(state) != set(self.transforms):
            raise ValueError(
                f"method {self.spec!r}: checkpoint holds transform states {sorted(state)}, "
                f"this method has {sorted(self.transforms)}"
            )
        for name, t in self.transforms.items():
            t.load_state_dict(state[name])

    def remove(self) -> None:
        """Detach every transform from the model."""
        for t in self.transforms.values():
            t.remove()


def _identity(model: nn.Module) -> nn.Module:
    return model


# ---- part builders ---------------------------------------------------------------------------
def _build_baseline(b: _Build) -> None:
    """Plain training: nothing to add."""


def _structural(kind: str) -> Callable[[_Build], None]:
    def build(b: _Build) -> None:
        b.model = reparam.convert(b.model, kind, bn=b.cfg.reparam.bn).model
        b.deploy = reparam.fuse

    return build


def _attach_sgs(b: _Build, name: str, sgs: SpatialGradientScaling) -> None:
    b.transforms[name] = sgs
    b.scaling = sgs


def _sgs_kwargs(b: _Build) -> dict[str, Any]:
    s = b.cfg.sgs
    kwargs: dict[str, Any] = {"mode": s.mode}
    if s.mode == "update":
        kwargs["optimizer"] = b.optimizer
    return kwargs


def _build_sgs(name: str) -> Callable[[_Build], None]:
    def build(b: _Build) -> None:
        s = b.cfg.sgs
        sgs = SpatialGradientScaling(
            b.model,
            k=s.k,
            measure=s.measure,
            diag_removal=s.diag_removal,
            schedule=RefreshSchedule(
                s.refresh_warmup, s.refresh_every, s.refresh_batches, s.refresh_align
            ),
            seed=b.cfg.seed,
            **_sgs_kwargs(b),
        )
        _attach_sgs(b, name, sgs)
        b.hooks.append(sgs.maybe_refresh)

    return build


def _is_3x3(_name: str, module: nn.Module) -> bool:
    return tuple(module.kernel_size) == (3, 3)


def _build_grid(b: _Build) -> None:
    """One fixed G = grid_scaling(α, β) on every 3×3 conv; other convs are left alone."""
    sgs = SpatialGradientScaling(b.model, include=_is_3x3, seed=b.cfg.seed, **_sgs_kwargs(b))
    g = grid_scaling(b.cfg.grid.alpha, b.cfg.grid.beta)
    for layer in sgs.scalings:
        sgs.set_scaling(layer, g)
    _attach_sgs(b, "grid", sgs)


def _build_branch(b: _Build) -> None:
    """Lemma 1's fixed G = Σ masks of ``branch.kind`` on every conv that structure converts.

    Not normalised: with one BatchNorm after the branch sum and SGD, plain training with this
    G follows the structure's merged weights exactly (``acb``, ``repvgg``).
    """
    kind = b.cfg.branch.kind
    sgs = SpatialGradientScaling(b.model, include=_convertible, seed=b.cfg.seed, **_sgs_kwargs(b))
    for layer, module in sgs.modules.items():
        sgs.set_scaling(layer, branch_scaling(kind, tuple(module.kernel_size)))
    _attach_sgs(b, "branch", sgs)


def _convertible(_name: str, module: nn.Module) -> bool:
    return not reparam.conversion_obstacle(module)


def _build_dyrep(b: _Build) -> None:
    """DyRep on the plain model: saliency every step, growth and pruning after the scheduled
    epochs, fused at the end.  A new block's BatchNorms are recalibrated on
    ``dyrep.recal_batches`` randomly drawn training batches (with their augmentation, drawn
    under the seed and the epoch; under ``torch.distributed`` rank r takes batches r,
    r + world, ... and the statistics are averaged over the ranks)."""
    d, seed = b.cfg.dyrep, b.cfg.seed
    dyrep = reparam.DyRep(
        b.model,
        b.optimizer,
        interval=d.interval,
        max_adjust=d.max_adjust,
        metric=d.metric,
        threshold=d.threshold,
        min_std=d.min_std,
        seed=seed,
    )

    def adjust(epoch: int, loader: Iterable[Any]) -> bool:
        if not dyrep.due(epoch):
            return False
        batches = None
        if d.recal_batches:
            batches = SampledBatches(
                loader,
                d.recal_batches,
                seed * 1_000_003 + epoch,
                where="dyrep",
                setting="dyrep.recal_batches",
                reseed=False,
            )
        report = dyrep.maybe_adjust(epoch, batches)
        return report is not None and report.changed

    def record(_folder: Path, _writes: bool) -> dict[str, Any]:
        return {
            "dyrep": {
                "structure": [[p, k, list(br)] for p, k, br in dyrep.structure()],
                "adjustments": [
                    {"epoch": r.epoch, "grown": r.grown, "score": r.score,
                     "cut": {n: list(c) for n, c in r.cut.items()}}
                    for r in dyrep.history
                ],
            }
        }  # fmt: skip

    b.transforms["dyrep"] = dyrep
    b.deploy = lambda model: reparam.fuse_dyrep(model, fold_batchnorm=True)
    b.step_hooks.append(lambda scaler: dyrep.record(scaler))
    b.end_hooks.append(adjust)
    b.record_hooks.append(record)


REPOPT_SCALES = "repopt_scales.pt"


def _build_repopt_hs(b: _Build) -> None:
    """RepOptimizers' hyper-search model: every 3×3-like conv → a CSLA block with trainable
    scales (no weight decay on s, t), gradients clipped to ``repopt.search_clip``; its scales
    are saved beside the run as ``repopt_scales.pt``."""
    r = b.cfg.repopt
    model = reparam.convert_csla(b.model, scale_init=r.scale_init).model
    b.model = model
    b.deploy = reparam.fuse_csla
    blocks = [m for m in model.modules() if isinstance(m, reparam.CSLABlock)]
    scales = {id(p) for m in blocks for p in (m.s, m.t)}
    optimizer = b.optimizer
    if len(optimizer.param_groups) != 1:
        raise ValueError("repopt-hs: expected the harness's one-group optimizer")
    group = optimizer.param_groups[0]
    group["params"] = [p for p in group["params"] if id(p) not in scales]
    optimizer.add_param_group(
        {"params": [p for m in blocks for p in (m.s, m.t)], "weight_decay": 0.0}
    )
    if r.search_clip > 0:

        def clip(scaler: torch.amp.GradScaler) -> None:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), r.search_clip)

        b.step_hooks.append(clip)

    def record(folder: Path, writes: bool) -> dict[str, Any]:
        saved = reparam.csla_scales(model)
        if writes:
            save_checkpoint(folder / REPOPT_SCALES, saved)
        return {
            "repopt_scales": REPOPT_SCALES,
            "scale_means": {
                n: {k: None if v is None else float(v.mean()) for k, v in s.items()}
                for n, s in saved.items()
            },
        }

    b.record_hooks.append(record)


def _build_repopt(b: _Build) -> None:
    """The target run: plain model re-initialised from the hyper-search scales, multipliers
    ``M`` on every CSLA-converted conv (SGD: gradient; AdamW: gradient and adaptive step)."""
    r, kind = b.cfg.repopt, b.cfg.optim.name
    if kind not in reparam.REPOPT_OPTIMIZERS:
        raise ValueError(
            f"repopt: the multipliers are derived for optim.name in {reparam.REPOPT_OPTIMIZERS}, "
            f"not {kind!r}"
        )
    if not r.scales:
        raise ValueError(
            "repopt: no hyper-search scales; train_run runs the search first, otherwise give "
            "repopt.scales=<the repopt_scales.pt of a repopt-hs run>"
        )
    hs = reparam.convert_csla(b.model, scale_init="ones").model
    reparam.load_csla_scales(hs, load_checkpoint(r.scales))
    generator = torch.Generator().manual_seed(b.cfg.seed)
    reparam.repopt_reinit(b.model, hs, identity=r.identity, generator=generator)
    scalings = reparam.repopt_scalings(hs, kind)
    b.transforms["repopt"] = reparam.attach_repopt(b.model, scalings, b.optimizer)

    def record(_folder: Path, _writes: bool) -> dict[str, Any]:
        return {
            "repopt": {
                "scales": r.scales,
                "mean_scaling": {n: g.mean(dim=(0, 1)).tolist() for n, g in scalings.items()},
            }
        }

    b.record_hooks.append(record)


def _build_cdg(b: _Build) -> None:
    c = b.cfg.cdg
    b.transforms["cdg"] = ChannelDirectedGradients(
        b.model, a=c.a, smoothing=c.smoothing, axis=c.axis
    )


def _build_pgt(b: _Build) -> None:
    pgt = PowerGrad(b.cfg.pgt.alpha, label_smoothing=b.cfg.optim.label_smoothing)
    b.loss = pgt
    b.transforms["pgt"] = pgt


def _registry() -> Mapping[str, MethodInfo]:
    infos = [
        MethodInfo("baseline", "plain training (cross-entropy, no transform)", "baseline",
                   _build_baseline),
        MethodInfo("sgs", "Spatial Gradient Scaling, G from spatial dependence (sgs.measure)",
                   "sgs", _build_sgs("sgs"), needs_refresh=True, param_transform=True,
                   uses_k=True, reports_scalings=True, section="sgs"),
        MethodInfo("sgs-autocorr", "SGS with |autocorrelation| as the dependence measure",
                   "sgs", _build_sgs("sgs-autocorr"), needs_refresh=True, param_transform=True,
                   uses_k=True, reports_scalings=True, section="sgs",
                   fixed=(("sgs.measure", "autocorrelation"),)),
        MethodInfo("grid", "fixed parametric 3x3 G (grid.alpha, grid.beta) on every 3x3 conv",
                   "sgs", _build_grid, param_transform=True, reports_scalings=True,
                   section="grid"),
        MethodInfo("branch", "fixed Lemma-1 G = sum of a structure's masks (branch.kind), "
                   "not normalised", "sgs", _build_branch, param_transform=True,
                   reports_scalings=True, section="branch"),
        MethodInfo("acb", "ACNet: 3x3 + 1x3 + 3x1 branches, fused after training",
                   "structural", _structural("acb"), structural=True, section="reparam"),
        MethodInfo("repvgg", "RepVGG: 3x3 + 1x1 + identity branches, fused after training",
                   "structural", _structural("repvgg"), structural=True, section="reparam"),
        MethodInfo("dbb", "Diverse Branch Block, fused after training", "structural",
                   _structural("dbb"), structural=True, section="reparam"),
        MethodInfo("cdg", "Channel-Directed Gradients (cdg.a, cdg.smoothing, cdg.axis)", "cdg",
                   _build_cdg, param_transform=True, section="cdg"),
        MethodInfo("pgt", "PowerGrad Transform loss (pgt.alpha)", "pgt", _build_pgt,
                   loss_transform=True, section="pgt"),
        MethodInfo("dyrep", "DyRep: grow salient convs into branch blocks, prune, fuse "
                   "(dyrep.interval, ...)", "structural", _build_dyrep, structural=True,
                   section="dyrep", changes_parameters=True),
        MethodInfo("repopt-hs", "RepOptimizers' hyper-search: CSLA blocks with trainable "
                   "scales, fused after training", "structural", _build_repopt_hs,
                   structural=True, section="repopt"),
        MethodInfo("repopt", "RepOptimizers: hyper-search run, then plain training with its "
                   "per-channel multipliers (repopt.search_epochs, ...)", "sgs", _build_repopt,
                   param_transform=True, section="repopt",
                   search=SearchStage("repopt-hs", REPOPT_SCALES, "repopt.scales",
                                      "repopt.search_epochs")),
    ]  # fmt: skip
    return MappingProxyType({i.name: i for i in infos})


#: Every method part by name.
METHODS: Mapping[str, MethodInfo] = _registry()


# ---- specs -----------------------------------------------------------------------------------
def parse_method(spec: str) -> tuple[tuple[MethodInfo, ...], tuple[tuple[str, str], ...]]:
    """Split a spec into its registered parts and its ``@key=value`` overrides.

    Raises ``ValueError`` for an unknown part (listing the valid names), a malformed override,
    or parts that do not compose.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"method must be a non-empty name; valid: {', '.join(METHODS)}")
    head, *raw_overrides = spec.strip().split("@")
    names = [n.strip() for n in head.split("+")]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(
            f"unknown method {unknown[0]!r} in {spec!r}; valid methods: {', '.join(METHODS)} "
            "(combine with '+', e.g. sgs+cdg; override settings with '@', e.g. sgs@k=3)"
        )
    parts = tuple(METHODS[n] for n in names)
    groups: dict[str, str] = {}
    for p in parts:
        if p.group in groups:
            raise ValueError(
                f"method {spec!r}: {groups[p.group]!r} and {p.name!r} do not compose "
                f"(both are {p.group!r} methods)"
            )
        groups[p.group] = p.name
    if len(parts) > 1 and "baseline" in groups:
        raise ValueError(f"method {spec!r}: 'baseline' cannot be combined with other methods")
    dynamic = [p.name for p in parts if p.changes_parameters]
    transforms = [p.name for p in parts if p.param_transform]
    if dynamic and transforms:
        raise ValueError(
            f"method {spec!r}: {dynamic[0]!r} replaces parameters during training, so "
            f"{transforms[0]!r}'s hooks on them would go stale; they do not compose"
        )
    overrides = []
    for item in raw_overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"method {spec!r}: override {item!r} is not key=value")
        overrides.append((key.strip(), value.strip()))
    return parts, tuple(overrides)


def resolve_method(cfg: RunConfig) -> tuple[tuple[MethodInfo, ...], RunConfig]:
    """The parts of ``cfg.method`` and the config with its overrides and forced settings."""
    parts, overrides = parse_method(cfg.method)
    sections = [p.section for p in parts if p.section]
    for key, value in overrides:
        cfg = apply_override(cfg, key, value, sections)
    for part in parts:
        for key, value in part.fixed:
            cfg = apply_override(cfg, key, value)
    return parts, cfg


def build_method(
    model: nn.Module,
    cfg: RunConfig,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
) -> MethodState:
    """Build ``cfg.method`` around ``model``.

    Pipeline: structural conversion (a copy of ``model``; train the returned
    :attr:`MethodState.model`), then ``make_optimizer(model)``, then the gradient and loss
    transforms in the order written, composed by :func:`gradshape.compose`.  ``cfg`` should
    come from :func:`resolve_method` (overrides applied).
    """
    parts, _ = parse_method(cfg.method)
    b = _Build(model, cfg, make_optimizer)
    for part in parts:
        if part.structural:
            part.build(b)
    for part in parts:
        if not part.structural:
            part.build(b)
    if len(b.transforms) > 1:
        compose(*b.transforms.values())
    loss = b.loss or nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
    return MethodState(
        spec=cfg.method,
        parts=parts,
        model=b.model,
        optimizer=b.optimizer,
        loss_fn=loss,
        transforms=b.transforms,
        epoch_hooks=b.hooks,
        scaling=b.scaling,
        deploy=b.deploy,
        step_hooks=b.step_hooks,
        epoch_end_hooks=b.end_hooks,
        record_hooks=b.record_hooks,
    )
