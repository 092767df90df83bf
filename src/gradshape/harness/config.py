"""The typed configuration of one training run, and its round trip through plain dicts.

A :class:`RunConfig` is everything :func:`gradshape.experiments.train.train_run` needs; it is
saved verbatim in every ``run.json`` and ``results.json`` record, so a result can always be
traced to its settings.  Sections group the flags of the ``gradshape`` CLI:

* :class:`DataConfig`: which data set, where, how much of it;
* :class:`ModelConfig`: which architecture and how wide;
* :class:`OptimConfig`: optimizer, learning-rate schedule, epochs, regularisation;
* :class:`SGSConfig`, :class:`GridConfig`, :class:`CDGConfig`, :class:`PGTConfig`,
  :class:`ReparamConfig`, :class:`BranchConfig`, :class:`DyRepConfig`, :class:`RepOptConfig`:
  the settings of each method (used only when the method asks).

Defaults follow the SGS paper's CIFAR setting where it gives one (SGD, momentum 0.9, lr 0.1,
batch 128, cosine schedule, k = 5, refresh after 1 warm-up epoch then every 30 from 20 batches).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "OPTIMIZERS",
    "BranchConfig",
    "CDGConfig",
    "DataConfig",
    "DyRepConfig",
    "GridConfig",
    "ModelConfig",
    "OptimConfig",
    "PGTConfig",
    "RepOptConfig",
    "ReparamConfig",
    "RunConfig",
    "SGSConfig",
    "apply_override",
]

#: Optimizers the harness builds by name.
OPTIMIZERS = ("sgd", "adam", "adamw", "adagrad", "rmsprop")


def _fail(section: str, name: str, value: Any, expected: str) -> None:
    raise ValueError(f"config {section}.{name} must be {expected}, got {value!r}")


def _check_int(section: str, name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        _fail(section, name, value, f"an int >= {low}")


def _check_real(
    section: str,
    name: str,
    value: Any,
    low: float,
    high: float = math.inf,
    *,
    open_low: bool = False,
) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if open_low else value >= low) and value <= high
    if not ok:
        bracket = "(" if open_low else "["
        _fail(section, name, value, f"a real number in {bracket}{low}, {high}]")


def _check_choice(section: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _fail(section, name, value, f"one of {choices}")


@dataclass
class DataConfig:
    """Data set and loading (see :func:`gradshape.experiments.data.load_dataset`).

    Attributes:
        dataset: a name of :data:`gradshape.experiments.data.DATASETS`.
        path: the data set's folder (``None``: the data set's default location).
        subset: train on the first ``subset`` training images only (``None``: all).
        pad_to: zero-pad images to this side length (e.g. 32 for 28×28 Fashion-MNIST).
        val_fraction: fraction of the training set held out as a validation split.
        image_size: side length image folders are resized/cropped to (``imagefolder`` only).
        augment: the data set's standard training augmentation.
        num_workers: DataLoader worker processes.
    """

    dataset: str = "fashion-mnist"
    path: str | None = None
    subset: int | None = None
    pad_to: int | None = None
    val_fraction: float = 0.0
    image_size: int = 64
    augment: bool = True
    num_workers: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.dataset, str) or not self.dataset:
            _fail("data", "dataset", self.dataset, "a data set name")
        if self.subset is not None:
            _check_int("data", "subset", self.subset, 1)
        if self.pad_to is not None:
            _check_int("data", "pad_to", self.pad_to, 1)
        _check_real("data", "val_fraction", self.val_fraction, 0.0, 0.9)
        _check_int("data", "image_size", self.image_size, 1)
        _check_int("data", "num_workers", self.num_workers, 0)


@dataclass
class ModelConfig:
    """Architecture (see :func:`gradshape.experiments.models.create_model`).

    Attributes:
        name: a name of :data:`gradshape.experiments.models.MODELS`.
        width: channel width multiplier.
        drop_last_pool: drop the last pooling stage (deep convs then see larger maps).
    """

    name: str = "vgg11"
    width: float = 1.0
    drop_last_pool: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            _fail("model", "name", self.name, "a model name")
        _check_real("model", "width", self.width, 0.0, open_low=True)


@dataclass
class OptimConfig:
    """Optimizer and schedule.

    The learning rate at step t of T (``W`` warm-up steps) is ``lr·t/W`` for ``t < W`` and
    ``lr·(1 + cos(π (t − W)/(T − W)))/2`` after it (cosine annealing to 0, stepped per batch).

    Attributes:
        name: one of :data:`OPTIMIZERS`.
        epochs: training epochs.
        batch_size: images per training batch.
        lr: peak learning rate.
        momentum: SGD momentum (also RMSprop's).
        weight_decay: L2 penalty (decoupled for AdamW, inside the gradient otherwise).
        warmup_epochs: epochs of linear learning-rate warm-up (may be fractional).
        label_smoothing: cross-entropy label smoothing in [0, 1).
    """

    name: str = "sgd"
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        _check_choice("optim", "name", self.name, OPTIMIZERS)
        _check_int("optim", "epochs", self.epochs, 1)
        _check_int("optim", "batch_size", self.batch_size, 1)
        _check_real("optim", "lr", self.lr, 0.0, open_low=True)
        _check_real("optim", "momentum", self.momentum, 0.0, 1.0)
        _check_real("optim", "weight_decay", self.weight_decay, 0.0)
        _check_real("optim", "warmup_epochs", self.warmup_epochs, 0.0)
        _check_real("optim", "label_smoothing", self.label_smoothing, 0.0, 0.999)


@dataclass
class SGSConfig:
    """Spatial Gradient Scaling settings (see :class:`gradshape.SpatialGradientScaling`).

    Attributes:
        k: the k-transform's parameter (paper Eq. 8).
        measure: ``"nmi"`` or ``"autocorrelation"`` (the ``sgs-autocorr`` method forces the
            latter).
        mode: ``"gradient"`` (scale the gradient) or ``"update"`` (scale the optimizer's step,
            the paper's Adagrad*; for adaptive optimizers).
        refresh_warmup, refresh_every, refresh_batches, refresh_align: the refresh schedule
            (:class:`gradshape.RefreshSchedule`); ``refresh_align="paper"`` refreshes at the
            warm-up epoch and then at every epoch divisible by ``refresh_every`` (the authors'
            code), ``"warmup"`` every ``refresh_every`` epochs counted from the warm-up.  A
            ``refresh_every`` beyond the last epoch freezes G after its first measurement.
        diag_removal: drop zero pairs before histogramming (paper's ImageNet setting).
    """

    k: float = 5.0
    measure: str = "nmi"
    mode: str = "gradient"
    refresh_warmup: int = 1
    refresh_every: int = 30
    refresh_batches: int = 20
    refresh_align: str = "paper"
    diag_removal: bool = False

    def __post_init__(self) -> None:
        _check_real("sgs", "k", self.k, 0.0, open_low=True)
        _check_choice("sgs", "measure", self.measure, ("nmi", "autocorrelation"))
        _check_choice("sgs", "mode", self.mode, ("gradient", "update"))
        _check_int("sgs", "refresh_warmup", self.refresh_warmup, 0)
        _check_int("sgs", "refresh_every", self.refresh_every, 1)
        _check_int("sgs", "refresh_batches", self.refresh_batches, 1)
        _check_choice("sgs", "refresh_align", self.refresh_align, ("paper", "warmup"))


@dataclass
class GridConfig:
    """The paper's parametric 3×3 scaling (:func:`gradshape.grid_scaling`) for every 3×3 conv.

    Defaults give ACB's ratios (centre/edge 1.5, centre/corner 3).
    """

    alpha: float = 1.5
    beta: float = 3.0

    def __post_init__(self) -> None:
        _check_real("grid", "alpha", self.alpha, 0.0, open_low=True)
        _check_real("grid", "beta", self.beta, 0.0, open_low=True)


@dataclass
class CDGConfig:
    """Channel-Directed Gradients metric ``M = P + a(I − P) + λ(−Δ)`` (``smoothing`` = λ).

    ``axis`` is the weight direction the metric couples: ``"output"`` (the paper's),
    ``"input"`` or ``"spatial"``.
    """

    a: float = 1.0
    smoothing: float = 1.0
    axis: str = "output"

    def __post_init__(self) -> None:
        _check_choice("cdg", "axis", self.axis, ("output", "input", "spatial"))
        _check_real("cdg", "a", self.a, 0.0)
        _check_real("cdg", "smoothing", self.smoothing, 0.0)
        if self.a + self.smoothing <= 0:
            _fail("cdg", "a + smoothing", self.a + self.smoothing, "> 0")


@dataclass
class PGTConfig:
    """PowerGrad Transform power α (backward uses softmax(α z))."""

    alpha: float = 0.25

    def __post_init__(self) -> None:
        _check_real("pgt", "alpha", self.alpha, 0.0, 1.0, open_low=True)


@dataclass
class ReparamConfig:
    """Structural baselines: where the BatchNorm sits (see :func:`gradshape.reparam.convert`)."""

    bn: str = "per_branch"

    def __post_init__(self) -> None:
        _check_choice("reparam", "bn", self.bn, ("per_branch", "after_sum"))


@dataclass
class BranchConfig:
    """Fixed Lemma-1 scalings: ``kind`` names the structure whose ``G = Σ masks`` is applied
    (not normalised) by the ``branch`` method (see :func:`gradshape.branch_scaling`)."""

    kind: str = "acb"

    def __post_init__(self) -> None:
        _check_choice("branch", "kind", self.kind, ("acb", "repvgg", "dbb"))


@dataclass
class DyRepConfig:
    """DyRep (see :class:`gradshape.reparam.DyRep`): grow the most salient conv after every
    ``interval``-th epoch while ``epoch < max_adjust``, cut weak branches.

    Defaults scale DyRep's ImageNet schedule (every 5 epochs, adjusting for the first 100 of
    120) to this harness's 30 epochs.  ``metric`` is the saliency (``synflow``, ``grad_norm``,
    ``snip``, ``random``); ``threshold`` and ``min_std`` are the pruning rule's constants;
    ``recal_batches`` training batches (drawn under the run's seed) re-estimate a new block's
    BatchNorms (0: none).
    """

    interval: int = 5
    max_adjust: int = 25
    metric: str = "synflow"
    threshold: float = 0.1
    min_std: float = 0.02
    recal_batches: int = 20

    def __post_init__(self) -> None:
        _check_int("dyrep", "interval", self.interval, 1)
        _check_int("dyrep", "max_adjust", self.max_adjust, 0)
        _check_choice("dyrep", "metric", self.metric, ("synflow", "grad_norm", "snip", "random"))
        _check_real("dyrep", "threshold", self.threshold, 0.0)
        _check_real("dyrep", "min_std", self.min_std, 0.0)
        _check_int("dyrep", "recal_batches", self.recal_batches, 0)


@dataclass
class RepOptConfig:
    """RepOptimizers (see :mod:`gradshape.reparam.repopt`): a hyper-search run of the CSLA
    model (method ``repopt-hs``), then the target run with the derived multipliers.

    Attributes:
        search_epochs: epochs of the hyper-search run (0: half the target run's, at least 1).
        search_clip: gradient-norm clip of the hyper-search run (the authors' 5; 0: none).
        scale_init: the hyper-search scales' start, ``"stage"`` (RepOpt-VGG's) or ``"ones"``.
        identity: the target's initial diagonal, the trained ``u`` (``"trained"``) or 1.
        scales: a scales file of an earlier ``repopt-hs`` run; empty: ``repopt`` runs the
            hyper-search itself, in ``<run folder>/search``.
    """

    search_epochs: int = 0
    search_clip: float = 5.0
    scale_init: str = "stage"
    identity: str = "trained"
    scales: str = ""

    def __post_init__(self) -> None:
        _check_int("repopt", "search_epochs", self.search_epochs, 0)
        _check_real("repopt", "search_clip", self.search_clip, 0.0)
        _check_choice("repopt", "scale_init", self.scale_init, ("stage", "ones"))
        _check_choice("repopt", "identity", self.identity, ("trained", "one"))
        if not isinstance(self.scales, str):
            _fail("repopt", "scales", self.scales, "a file path or ''")


_SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "optim": OptimConfig,
    "sgs": SGSConfig,
    "grid": GridConfig,
    "cdg": CDGConfig,
    "pgt": PGTConfig,
    "reparam": ReparamConfig,
    "branch": BranchConfig,
    "dyrep": DyRepConfig,
    "repopt": RepOptConfig,
}


@dataclass
class RunConfig:
    """One run: a method (see :mod:`gradshape.experiments.methods`), a seed, and every section.

    Attributes:
        method: a method spec, e.g. ``"baseline"``, ``"sgs"``, ``"sgs+cdg"``, ``"sgs@k=3"``.
        seed: seeds weight initialisation, data order, augmentation and refresh batches.
        device: ``"auto"`` (CUDA when available, else CPU) or a torch device string.
        amp: mixed precision (float16 autocast + GradScaler); ``None`` = on for CUDA only.
        eval_every: evaluate the validation and test splits after every ``eval_every``-th
            epoch and always after the last (``0``: after the last only).  Evaluation draws no
            random numbers, so it never changes what is trained.
    """

    method: str = "baseline"
    seed: int = 0
    device: str = "auto"
    amp: bool | None = None
    eval_every: int = 1
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sgs: SGSConfig = field(default_factory=SGSConfig)
    grid: GridConfig = field(default_factory=GridConfig)
    cdg: CDGConfig = field(default_factory=CDGConfig)
    pgt: PGTConfig = field(default_factory=PGTConfig)
    reparam: ReparamConfig = field(default_factory=ReparamConfig)
    branch: BranchConfig = field(default_factory=BranchConfig)
    dyrep: DyRepConfig = field(default_factory=DyRepConfig)
    repopt: RepOptConfig = field(default_factory=RepOptConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.method, str) or not self.method:
            _fail("run", "method", self.method, "a method name")
        _check_int("run", "seed", self.seed, 0)
        if not isinstance(self.device, str) or not self.device:
            _fail("run", "device", self.device, "'auto' or a torch device string")
        if self.amp is not None and not isinstance(self.amp, bool):
            _fail("run", "amp", self.amp, "True, False or None")
        _check_int("run", "eval_every", self.eval_every, 0)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (nested by section)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError`` naming them."""
        if not isinstance(data, Mapping):
            raise TypeError(f"RunConfig.from_dict expects a mapping, got {type(data).__name__}")
        top = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - top
        if unknown:
            raise ValueError(f"RunConfig.from_dict: unknown keys {sorted(unknown)}")
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            section = _SECTIONS.get(key)
            if section is None:
                kwargs[key] = value
                continue
            if not isinstance(value, Mapping):
                raise TypeError(f"RunConfig.from_dict: section {key!r} must be a mapping")
            names = {f.name for f in dataclasses.fields(section)}
            extra = set(value) - names
            if extra:
                raise ValueError(f"RunConfig.from_dict: unknown keys in {key!r}: {sorted(extra)}")
            kwargs[key] = section(**value)
        return cls(**kwargs)


def apply_override(cfg: RunConfig, key: str, raw: str, prefer: Sequence[str] = ()) -> RunConfig:
    """A copy of ``cfg`` with one method setting replaced, from a method spec's ``@key=value``.

    ``key`` is ``section.field`` (``grid.alpha``) or a bare field name found in exactly one
    method section (``k`` → ``sgs.k``); a bare name found in several is taken from the one
    section among ``prefer`` (the sections of the spec's own methods) that has it, so
    ``grid@alpha=2`` means ``grid.alpha``.  ``raw`` is converted to the field's current type.
    """
    method_sections = ("sgs", "grid", "cdg", "pgt", "reparam", "branch", "dyrep", "repopt")
    if "." in key:
        section, name = key.split(".", 1)
        if section not in method_sections:
            raise ValueError(f"method override {key!r}: section must be one of {method_sections}")
    else:
        owners = [
            s for s in method_sections if key in {f.name for f in dataclasses.fields(_SECTIONS[s])}
        ]
        if len(owners) > 1:
            owners = [s for s in owners if s in prefer] or owners
        if len(owners) != 1:
            hint = "no method section has it" if not owners else f"ambiguous: {owners}"
            raise ValueError(f"method override {key!r}: {hint}; write section.field")
        section, name = owners[0], key
    current = getattr(cfg, section)
    if name not in {f.name for f in dataclasses.fields(current)}:
        raise ValueError(f"method override {key!r}: {section} has no setting {name!r}")
    old = getattr(current, name)
    value: Any
    try:
        if isinstance(old, bool):
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError(raw)
            value = raw.lower() in ("true", "1")
        elif isinstance(old, int):
            value = int(raw)
        elif isinstance(old, float):
            value = float(raw)
        else:
            value = raw
    except ValueError:
        raise ValueError(
            f"method override {key}={raw!r}: expected a {type(old).__name__}"
        ) from None
    return dataclasses.replace(cfg, **{section: dataclasses.replace(current, **{name: value})})
