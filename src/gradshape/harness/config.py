"""The typed configuration of one training run, and its round trip through plain dicts.

A :class:`RunConfig` is everything :func:`gradshape.harness.train.train_run` needs; it is
saved verbatim in every ``run.json`` and ``results.json`` record, so a result can always be
traced to its settings.  Sections group the flags of the ``gradshape`` CLI:

* :class:`DataConfig`: which data set, where, how much of it;
* :class:`ModelConfig`: which architecture and how wide;
* :class:`OptimConfig`: optimizer, learning-rate schedule, epochs, regularisation;
* :class:`SGSConfig`, :class:`GridConfig`, :class:`CDGConfig`, :class:`PGTConfig`,
  :class:`ReparamConfig`, :class:`BranchConfig`, :class:`DyRepConfig`, :class:`RepOptConfig`:
  the settings of each method (used only when the method asks).

The classes are the one source of every setting's name, type, default and help text: the
``gradshape`` command line and its config files are generated from them (see
:mod:`gradshape.cli`), with the ``Attributes`` of each docstring as the help.  A setting with a
fixed set of values is typed ``Literal[...]``; those values are also what ``__post_init__``
accepts.  :func:`dump_yaml` and :func:`load_config_file` write and read the ``config.yaml`` of
a run or comparison folder.

Defaults follow the SGS paper's CIFAR setting where it gives one (SGD, momentum 0.9, lr 0.1,
batch 128, cosine schedule, k = 5, refresh after 1 warm-up epoch then every 30 from 20 batches).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .data import DATASETS
from .models import MODELS

__all__ = [
    "CONFIG_FILE",
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
    "dump_yaml",
    "load_config_file",
    "write_config_file",
]

#: The settings of a run or comparison folder, as YAML (see :func:`write_config_file`).
CONFIG_FILE = "config.yaml"
# The names a Literal field accepts come from the registries that build them.
DatasetName = Literal[DATASETS]  # type: ignore[valid-type]
ModelName = Literal[MODELS]  # type: ignore[valid-type]
OptimizerName = Literal["sgd", "adam", "adamw", "adagrad", "rmsprop"]
#: Optimizers the harness builds by name.
OPTIMIZERS: tuple[str, ...] = typing.get_args(OptimizerName)


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


@functools.cache
def _literal_fields(cls: type) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    """``(field, allowed values)`` of every ``Literal``-typed field of dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    return tuple(
        (f.name, typing.get_args(hints[f.name]))
        for f in dataclasses.fields(cls)
        if typing.get_origin(hints[f.name]) is Literal
    )


def _check_choices(obj: Any, section: str) -> None:
    """Every ``Literal`` field of ``obj`` holds one of its values."""
    for name, choices in _literal_fields(type(obj)):
        value = getattr(obj, name)
        if value not in choices:
            _fail(section, name, value, f"one of {choices}")


@dataclass
class DataConfig:
    """Data set and loading (see :func:`gradshape.harness.data.load_dataset`).

    Attributes:
        dataset: the data set (the names of :data:`gradshape.harness.data.DATASETS`).
        path: the data set's folder (``None``: the data set's usual place, e.g.
            ``/usr/share/datasets/fashion-mnist``).
        subset: train on the first ``subset`` training images only (``None``: all).
        pad_to: zero-pad images to this side length (e.g. 32 for 28×28 Fashion-MNIST;
            ``None``: no padding).
        val_fraction: fraction of the training set held out as a validation split (0: none).
        image_size: side length image folders are resized and cropped to (``imagefolder``
            only).
        augment: the data set's standard training augmentation.
        num_workers: DataLoader worker processes.
    """

    dataset: DatasetName = "fashion-mnist"
    path: str | None = None
    subset: int | None = None
    pad_to: int | None = None
    val_fraction: float = 0.0
    image_size: int = 64
    augment: bool = True
    num_workers: int = 0

    def __post_init__(self) -> None:
        _check_choices(self, "data")
        if self.subset is not None:
            _check_int("data", "subset", self.subset, 1)
        if self.pad_to is not None:
            _check_int("data", "pad_to", self.pad_to, 1)
        _check_real("data", "val_fraction", self.val_fraction, 0.0, 0.9)
        _check_int("data", "image_size", self.image_size, 1)
        _check_int("data", "num_workers", self.num_workers, 0)


@dataclass
class ModelConfig:
    """Architecture (see :func:`gradshape.harness.models.create_model`).

    Attributes:
        name: the architecture (the names of :data:`gradshape.harness.models.MODELS`).
        width: channel width multiplier.
        drop_last_pool: drop the last pooling stage (deep convs then see larger maps).
    """

    name: ModelName = "vgg11"
    width: float = 1.0
    drop_last_pool: bool = False

    def __post_init__(self) -> None:
        _check_choices(self, "model")
        _check_real("model", "width", self.width, 0.0, open_low=True)


@dataclass
class OptimConfig:
    """Optimizer and schedule.

    The learning rate at step t of T (``W`` warm-up steps) is ``lr·t/W`` for ``t < W`` and
    ``lr·(1 + cos(π (t − W)/(T − W)))/2`` after it (cosine annealing to 0, stepped per batch).

    Attributes:
        name: the optimizer (SGD and RMSprop use ``momentum``).
        epochs: training epochs.
        batch_size: images per training batch (the global batch under torchrun).
        lr: peak learning rate, reached after the warm-up; cosine decay to 0 after it.
        momentum: SGD momentum (also RMSprop's).
        weight_decay: L2 penalty (decoupled for AdamW, inside the gradient otherwise).
        warmup_epochs: epochs of linear learning-rate warm-up (may be fractional).
        label_smoothing: cross-entropy label smoothing in [0, 1).
    """

    name: OptimizerName = "sgd"
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        _check_choices(self, "optim")
        _check_int("optim", "epochs", self.epochs, 1)
        _check_int("optim", "batch_size", self.batch_size, 1)
        _check_real("optim", "lr", self.lr, 0.0, open_low=True)
        _check_real("optim", "momentum", self.momentum, 0.0, 1.0)
        _check_real("optim", "weight_decay", self.weight_decay, 0.0)
        _check_real("optim", "warmup_epochs", self.warmup_epochs, 0.0)
        _check_real("optim", "label_smoothing", self.label_smoothing, 0.0, 0.999)


@dataclass
class SGSConfig:
    """Spatial Gradient Scaling (methods sgs, sgs-autocorr).

    See :class:`gradshape.SpatialGradientScaling`.  The refresh schedule
    (:class:`gradshape.RefreshSchedule`) measures G after
    ``refresh_warmup`` epochs and then again every ``refresh_every`` epochs; a
    ``refresh_every`` beyond the last epoch freezes G after its first measurement.

    Attributes:
        k: the k-transform's parameter (paper Eq. 8).
        measure: the spatial dependence measure (the ``sgs-autocorr`` method forces
            ``autocorrelation``).
        mode: ``gradient`` scales the gradient; ``update`` scales the optimizer's step (the
            paper's Adagrad*, for adaptive optimizers).
        refresh_warmup: epochs with G = 1 before the first refresh.
        refresh_every: epochs between refreshes (the paper's CIFAR setting is 30 for 600
            epochs: lower it for short runs).
        refresh_batches: random training batches each refresh measures.
        refresh_align: ``paper`` refreshes at the warm-up epoch and then at every epoch
            divisible by ``refresh_every`` (the authors' code); ``warmup`` every
            ``refresh_every`` epochs counted from the warm-up.
        diag_removal: drop zero pixel pairs before the histogram (the paper's ImageNet
            setting).
    """

    k: float = 5.0
    measure: Literal["nmi", "autocorrelation"] = "nmi"
    mode: Literal["gradient", "update"] = "gradient"
    refresh_warmup: int = 1
    refresh_every: int = 30
    refresh_batches: int = 20
    refresh_align: Literal["paper", "warmup"] = "paper"
    diag_removal: bool = False

    def __post_init__(self) -> None:
        _check_choices(self, "sgs")
        _check_real("sgs", "k", self.k, 0.0, open_low=True)
        _check_int("sgs", "refresh_warmup", self.refresh_warmup, 0)
        _check_int("sgs", "refresh_every", self.refresh_every, 1)
        _check_int("sgs", "refresh_batches", self.refresh_batches, 1)


@dataclass
class GridConfig:
    """The paper's parametric 3×3 G for every 3×3 conv (method grid).

    See :func:`gradshape.grid_scaling`.

    Attributes:
        alpha: centre/edge ratio of G (the default is ACB's).
        beta: centre/corner ratio of G (the default is ACB's).
    """

    alpha: float = 1.5
    beta: float = 3.0

    def __post_init__(self) -> None:
        _check_real("grid", "alpha", self.alpha, 0.0, open_low=True)
        _check_real("grid", "beta", self.beta, 0.0, open_low=True)


@dataclass
class CDGConfig:
    """Channel-Directed Gradients (method cdg): the metric ``M = P + a(I − P) + λ(−Δ)``.

    Attributes:
        a: weight of the zero-mean part ``I − P``.
        smoothing: the Sobolev smoothing λ.
        axis: the weight direction the metric couples (``output`` is the paper's).
    """

    a: float = 1.0
    smoothing: float = 1.0
    axis: Literal["output", "input", "spatial"] = "output"

    def __post_init__(self) -> None:
        _check_choices(self, "cdg")
        _check_real("cdg", "a", self.a, 0.0)
        _check_real("cdg", "smoothing", self.smoothing, 0.0)
        if self.a + self.smoothing <= 0:
            _fail("cdg", "a + smoothing", self.a + self.smoothing, "> 0")


@dataclass
class PGTConfig:
    """PowerGrad Transform (method pgt).

    Attributes:
        alpha: the power α in (0, 1]: the backward pass uses softmax(α z).
    """

    alpha: float = 0.25

    def __post_init__(self) -> None:
        _check_real("pgt", "alpha", self.alpha, 0.0, 1.0, open_low=True)


@dataclass
class ReparamConfig:
    """Structural methods acb, repvgg, dbb (see :func:`gradshape.reparam.convert`).

    Attributes:
        bn: ``per_branch``: a BatchNorm per branch (the papers'); ``after_sum``: one after the
            branch sum (Lemma 1's form).
    """

    bn: Literal["per_branch", "after_sum"] = "per_branch"

    def __post_init__(self) -> None:
        _check_choices(self, "reparam")


@dataclass
class BranchConfig:
    """Fixed Lemma-1 scalings (method branch; see :func:`gradshape.branch_scaling`).

    Attributes:
        kind: the structure whose ``G = Σ masks`` is applied, not normalised.
    """

    kind: Literal["acb", "repvgg", "dbb"] = "acb"

    def __post_init__(self) -> None:
        _check_choices(self, "branch")


@dataclass
class DyRepConfig:
    """DyRep (method dyrep; see :class:`gradshape.reparam.DyRep`).

    Grows the most salient conv after every ``interval``-th epoch while ``epoch < max_adjust``
    and cuts weak branches.  The defaults scale DyRep's ImageNet schedule (every 5 epochs,
    adjusting for the first 100 of 120) to this harness's 30 epochs.

    Attributes:
        interval: epochs between structure adjustments.
        max_adjust: no adjustment from this epoch on.
        metric: the saliency that picks the conv to grow.
        threshold: the pruning rule's threshold on a branch's BatchNorm scale.
        min_std: the pruning rule's minimum standard deviation.
        recal_batches: training batches (drawn under the run's seed) that re-estimate a new
            block's BatchNorms (0: none).
    """

    interval: int = 5
    max_adjust: int = 25
    metric: Literal["synflow", "grad_norm", "snip", "random"] = "synflow"
    threshold: float = 0.1
    min_std: float = 0.02
    recal_batches: int = 20

    def __post_init__(self) -> None:
        _check_choices(self, "dyrep")
        _check_int("dyrep", "interval", self.interval, 1)
        _check_int("dyrep", "max_adjust", self.max_adjust, 0)
        _check_real("dyrep", "threshold", self.threshold, 0.0)
        _check_real("dyrep", "min_std", self.min_std, 0.0)
        _check_int("dyrep", "recal_batches", self.recal_batches, 0)


@dataclass
class RepOptConfig:
    """RepOptimizers (methods repopt, repopt-hs; see :mod:`gradshape.reparam.repopt`).

    ``repopt`` runs a hyper-search of the CSLA model (method ``repopt-hs``) first, then the
    target run with the multipliers derived from it.

    Attributes:
        search_epochs: epochs of the hyper-search run (0: half the target run's, at least 1).
        search_clip: gradient-norm clip of the hyper-search run (the authors' 5; 0: none).
        scale_init: the hyper-search scales' start, ``stage`` (RepOpt-VGG's) or ``ones``.
        identity: the target's initial diagonal: the trained ``u`` or 1.
        scales: a scales file of an earlier ``repopt-hs`` run; empty: ``repopt`` runs the
            hyper-search itself, in ``<run folder>/search``.
    """

    search_epochs: int = 0
    search_clip: float = 5.0
    scale_init: Literal["stage", "ones"] = "stage"
    identity: Literal["trained", "one"] = "trained"
    scales: str = ""

    def __post_init__(self) -> None:
        _check_choices(self, "repopt")
        _check_int("repopt", "search_epochs", self.search_epochs, 0)
        _check_real("repopt", "search_clip", self.search_clip, 0.0)
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
    """One run: a method (see :mod:`gradshape.harness.methods`), a seed, and every section.

    Attributes:
        method: a method spec, e.g. ``baseline``, ``sgs``, ``sgs+cdg``, ``sgs@k=3`` (the
            methods are listed below).
        seed: seeds weight initialisation, data order, augmentation and refresh batches.
        device: ``auto`` (CUDA when available, else CPU) or a torch device string (``cpu``,
            ``cuda``, ``cuda:1``, ...).
        amp: float16 mixed precision with a GradScaler (``None``: on for CUDA only).
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


def dump_yaml(data: Mapping[str, Any]) -> str:
    """``data`` (a config as nested dicts of plain values) as YAML text, keys in their order.

    Without PyYAML (an optional dependency, installed with ``gradshape[cli]``) the text is
    indented JSON, which is YAML too.
    """
    try:
        import yaml
    except ImportError:
        return json.dumps(data, indent=2) + "\n"
    return yaml.safe_dump(dict(data), sort_keys=False, allow_unicode=True)


def write_config_file(path: str | Path, data: Mapping[str, Any]) -> None:
    """Write ``data`` to ``path`` as YAML (:func:`dump_yaml`), atomically: a reader sees the old
    file or the new one, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(dump_yaml(data))
    tmp.replace(path)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in the YAML (or JSON) file ``path``.

    JSON is tried first, so a file :func:`dump_yaml` wrote without PyYAML reads back exactly
    (YAML 1.1 would read ``1e-05`` as a string).  Raises ``ValueError`` naming the file when it
    is not a mapping or cannot be parsed, and when it is YAML and PyYAML is missing.
    """
    path = Path(path)
    text = path.read_text()
    try:
        data = json.loads(text)
    except ValueError:
        try:
            import yaml
        except ImportError:
            raise ValueError(
                f"{path}: reading YAML needs PyYAML: pip install 'gradshape[cli]'"
            ) from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ValueError(f"{path} is not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of settings, got {type(data).__name__}")
    return data
