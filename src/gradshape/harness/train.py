"""One training run: data, model, method, the loop, evaluation, checkpoints, the run record.

:func:`train_run` is what ``gradshape train`` calls.  It writes into its run folder

* ``checkpoint.pt``: after every epoch, atomically (model, optimizer, scheduler, AMP scaler,
  transform states, every RNG state, history); ``resume=True`` continues from it and ends with
  the same weights and history, bit for bit, as a run that was never interrupted (on CPU;
  CUDA kernels are run in cuDNN's deterministic mode but not every GPU op is deterministic);
* ``run.json``: the run's record (see :func:`train_run`), the unit that
  :mod:`~gradshape.harness.compare` aggregates and :mod:`~gradshape.harness.report`
  reads;
* ``config.yaml``: the run's settings (its :class:`~gradshape.harness.config.RunConfig`
  after the method spec's overrides), written atomically before training; ``gradshape train
  --config <run folder>/config.yaml`` trains the same run again, and ``resume=True`` refuses a
  config that differs from it (folders made before config.yaml existed are checked against
  ``run.json`` or the checkpoint instead).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import reparam
from ..distributed import all_reduce_, fail_together, rank_and_world
from .checkpoint import load_checkpoint, save_checkpoint
from .config import (
    CONFIG_FILE,
    RunConfig,
    apply_override,
    load_config_file,
    write_config_file,
)
from .data import load_dataset, make_loader, without_augmentation
from .launch import check_in_sync, device_for_rank, is_main_process
from .methods import MethodInfo, MethodState, SearchStage, build_method, resolve_method
from .models import create_model
from .tracking import check_logger, open_tracker

__all__ = [
    "RunExistsError",
    "WarmupCosine",
    "evaluate",
    "kernel_magnitude",
    "make_optimizer",
    "parameter_count",
    "prepare_run_dir",
    "resolve_device",
    "train_run",
]

CHECKPOINT = "checkpoint.pt"
RUN_RECORD = "run.json"
_FORMAT = 1
# Settings a resumed run may change without changing its arithmetic.
_RESUME_FREE = (
    ("device",),
    ("eval_every",),
    ("data", "path"),
    ("data", "num_workers"),
    ("repopt", "scales"),  # set by train_run to the search stage's file: depends on the folder
)
SEARCH_DIR = "search"


class RunExistsError(FileExistsError):
    """A run folder already holds results and neither resume nor overwrite was asked for."""


# ---- set-up ----------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; any other string is parsed by torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"device {name!r} is not a torch device ({err})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: CUDA is not available on this machine")
    return device


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


@contextlib.contextmanager
def _deterministic(device: torch.device) -> Iterator[None]:
    """Deterministic kernels for the duration of a run; the global flags are restored after."""
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2:]


def make_optimizer(model: nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg.optim.name`` over all of ``model``'s parameters."""
    o = cfg.optim
    params = model.parameters()
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    if o.name == "adagrad":
        return torch.optim.Adagrad(params, lr=o.lr, weight_decay=o.weight_decay)
    if o.name == "rmsprop":
        return torch.optim.RMSprop(
            params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay
        )
    raise ValueError(f"optim.name: unknown optimizer {o.name!r}")


class WarmupCosine:
    """Learning-rate factor at optimizer step t: linear warm-up, then cosine decay to 0.

    ``f(t) = (t + 1)/W`` for ``t < W``, else ``(1 + cos(π·(t − W)/(T − W)))/2``, with ``T``
    total steps and ``W`` warm-up steps (``W = 0``: pure cosine).  Used with
    ``torch.optim.lr_scheduler.LambdaLR`` stepped once per batch.
    """

    def __init__(self, total_steps: int, warmup_steps: int) -> None:
        if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
            raise ValueError(
                f"WarmupCosine: need total_steps >= 1 and 0 <= warmup_steps <= total_steps, "
                f"got {total_steps}, {warmup_steps}"
            )
        self.total_steps, self.warmup_steps = total_steps, warmup_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def prepare_run_dir(out_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Create ``out_dir`` or check that it may be used.

    A folder holding a checkpoint or a run record is refused (:class:`RunExistsError`) unless
    ``resume`` (continue it) or ``overwrite`` (delete those two files and start over).
    """
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: pick one")
    ours = [out_dir / CHECKPOINT, out_dir / RUN_RECORD]
    if any(p.exists() for p in ours) and not resume:
        if not overwrite:
            raise RunExistsError(
                f"run folder {out_dir} already holds a run; pass --overwrite to replace it "
                "or --resume to continue it"
            )
        for p in ours:
            p.unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)


# ---- RNG state -------------------------------------------------------------------------------
def _rng_state(generator: torch.Generator | None) -> dict[str, Any]:
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": [version, list(mt), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "loader": generator.get_state() if generator is not None else None,
    }


def _set_rng_state(state: dict[str, Any], generator: torch.Generator | None) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if generator is not None and state["loader"] is not None:
        generator.set_state(state["loader"])


# ---- measurements ----------------------------------------------------------------------------
def parameter_count(model: nn.Module) -> int:
    """Number of trainable and frozen parameters (each shared Parameter counted once)."""
    return sum(p.numel() for p in model.parameters())


def kernel_magnitude(model: nn.Module) -> dict[str, list]:
    """Average kernel magnitude matrix per conv (paper Sec. 4.3, Fig. 6).

    For each convolution whose kernel has more than one position, with weight ``W`` of shape
    ``(c_out, c_in/groups, *K)``: ``A = mean_{o,i} |W[o, i]|`` (shape ``K``), divided by its
    mean so that ``mean(A) = 1``.  Keyed by module name, as nested lists.
    """
    out: dict[str, list] = {}
    for name, m in model.named_modules():
        if not isinstance(m, nn.modules.conv._ConvNd) or math.prod(m.kernel_size) == 1:
            continue
        a = m.weight.detach().abs().double().mean(dim=(0, 1))
        mean = a.mean()
        out[name] = (a / mean if mean > 0 else torch.ones_like(a)).tolist()
    return out


@contextlib.contextmanager
def _autocast(device: torch.device, amp: bool) -> Iterator[None]:
    if amp:
        with torch.autocast(device.type, dtype=torch.float16):
            yield
    else:
        yield


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, device: torch.device, *, amp: bool = False) -> float:
    """Top-1 accuracy (a fraction) of ``model`` in eval mode over ``loader``.

    The model's training flags are restored afterwards.
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    correct = total = 0
    try:
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with _autocast(device, amp):
                logits = model(x)
            correct += int((logits.argmax(dim=1) == y).sum())
            total += y.numel()
    finally:
        for m, training in flags:
            m.training = training
    if total == 0:
        raise ValueError("evaluate: the loader yielded no samples")
    return correct / total


class _Progress:
    """A tqdm bar per epoch on a terminal (when tqdm is installed), and one line per epoch.

    Redirected to a file or a CI log, only the per-epoch lines are written.
    """

    def __init__(self, enabled: bool, label: str) -> None:
        self.enabled, self.label = enabled, label
        self._tqdm = None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm.auto import tqdm
            except ImportError:
                tqdm = None
            self._tqdm = tqdm
        self._bar = None

    def start(self, epoch: int, epochs: int, steps: int) -> None:
        if self._tqdm is not None:
            self._bar = self._tqdm(
                total=steps,
                desc=f"{self.label} epoch {epoch + 1}/{epochs}",
                unit="batch",
                leave=False,
                file=sys.stderr,
                dynamic_ncols=True,
            )

    def show(self, loss: float, acc: float, speed: float) -> None:
        if self._bar is not None:
            self._bar.set_postfix(
                loss=f"{loss:.3f}", acc=f"{acc:.1%}", img_s=f"{speed:.0f}", refresh=False
            )

    def advance(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def end(self, line: str) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.enabled:
            print(f"{self.label} {line}", file=sys.stderr, flush=True)


def _train_epoch(
    method: MethodState,
    forward_model: nn.Module,
    loader: Any,
    device: torch.device,
    amp: bool,
    scaler: torch.amp.GradScaler,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    progress: _Progress,
) -> tuple[float, float, int]:
    """One pass over ``loader``; returns (mean loss, accuracy, images).

    ``forward_model`` is ``method.model`` or its ``DistributedDataParallel`` wrapper.
    """
    model, optimizer = forward_model, method.optimizer
    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    start = time.perf_counter()
    for step, (x, y) in enumerate(loader):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, amp):
            logits = model(x)
            loss = method.loss_fn(logits, y)
        scaler.scale(loss).backward()
        for hook in method.step_hooks:
            hook(scaler)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        loss_sum += loss.detach().double() * y.numel()
        correct += (logits.detach().argmax(dim=1) == y).sum()
        seen += y.numel()
        if progress.enabled:
            # reading the running sums synchronises with the device: every 10 steps only
            if step % 10 == 0:
                elapsed = max(time.perf_counter() - start, 1e-9)
                progress.show(float(loss_sum) / seen, int(correct) / seen, seen / elapsed)
            progress.advance()
    if seen == 0:
        raise ValueError("the training loader yielded no samples")
    return float(loss_sum) / seen, int(correct) / seen, seen


def _all_ranks(
    loss: float, acc: float, seen: int, device: torch.device
) -> tuple[float, float, int]:
    """Mean loss, accuracy and image count over every rank's share of an epoch."""
    sums = torch.tensor([loss * seen, acc * seen, seen], dtype=torch.float64, device=device)
    all_reduce_(sums, "sum")
    total = round(float(sums[2]))
    return float(sums[0]) / total, float(sums[1]) / total, total


def _config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    free = {".".join(k) for k in _RESUME_FREE}
    diffs = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += [f"{key}.{d}" for d in _config_differences(a, b) if f"{key}.{d}" not in free]
        elif a != b and key not in free:
            diffs.append(key)
    return diffs


def _check_same_settings(saved: dict[str, Any], cfg: RunConfig, source: Path) -> None:
    with contextlib.suppress(TypeError, ValueError):
        # settings added since the run started take their defaults
        saved = RunConfig.from_dict(saved).to_dict()
    diffs = _config_differences(saved, cfg.to_dict())
    if diffs:
        raise ValueError(
            f"cannot resume from {source}: it was started with different settings ({diffs}); "
            "use the same settings, or --overwrite to start over"
        )


def _saved_config(out_dir: Path) -> tuple[dict[str, Any], Path] | None:
    """The settings a run folder was started with, and the file they come from: config.yaml,
    else (folders made before it existed) run.json's or the checkpoint's; None if none."""
    path = out_dir / CONFIG_FILE
    if path.exists():
        return load_config_file(path), path
    path = out_dir / RUN_RECORD
    if path.exists():
        return json.loads(path.read_text())["config"], path
    path = out_dir / CHECKPOINT
    if path.exists():
        return load_checkpoint(path)["config"], path
    return None


def _scaling_record(method: MethodState) -> dict[str, Any] | None:
    sgs = method.scaling
    if sgs is None:
        return None
    return {
        "history": [
            {"epoch": epoch, "layers": {n: g.tolist() for n, g in layers.items()}}
            for epoch, layers in sgs.history
        ],
        "final": {n: g.tolist() for n, g in sgs.scalings.items()},
    }


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


# ---- the run ---------------------------------------------------------------------------------
def train_run(
    cfg: RunConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    logger: str | None = None,
) -> dict[str, Any]:
    """Train ``cfg.method`` once and return its record (also written to ``out_dir/run.json``).

    Pipeline: seed torch, numpy and ``random`` with ``cfg.seed``; load the data; build the
    model (same initial weights for every method with the same seed); build the method
    (structural conversion, optimizer, transforms, loss); then per epoch: the method's epoch
    hooks (SGS refresh), one pass of training with a per-batch cosine/warm-up learning rate,
    evaluation on the validation (if any) and test splits, and an atomic checkpoint.

    The record holds ``method``, ``seed``, ``k`` (for methods that use it), ``config``,
    ``test_acc`` and ``val_acc`` (fractions; for structural methods the fused model's, with
    ``test_acc_unfused`` and ``fusion_max_abs_diff`` beside them), ``train_eval_acc`` (the
    final model's accuracy on the training images without augmentation, in eval mode: how well
    the run fits its training set), ``train_seconds`` (training passes and refreshes, no
    evaluation), ``refresh_seconds``, ``eval_seconds``, ``params`` (at training time) and
    ``params_deployed`` (after fusion), ``history`` (per epoch: ``epoch``, ``train_loss``,
    ``train_acc`` (running, on the augmented batches in training mode), ``val_acc`` and
    ``test_acc`` (``None`` on the epochs ``cfg.eval_every`` skips), ``seconds``, ``lr``,
    ``images`` (trained on, all ranks), ``images_per_second``, ``refreshed``), ``scalings``
    (for SGS-type methods: G per layer at every refresh and at the end),
    ``kernel_magnitude`` (see :func:`kernel_magnitude`), and the entries of the method's record
    hooks (``dyrep``: the grown structure and each adjustment; ``repopt-hs``: the scales file
    ``repopt_scales.pt`` it writes beside the run; ``repopt``: the scales used and the mean
    multiplier per layer).

    A method with a search stage (``repopt``) first trains the stage's method in
    ``out_dir/search`` (resumed and overwritten with the run) and reads its output; the record
    then holds ``search`` (method, folder, epochs, ``train_seconds``, ``test_acc``) and
    ``search_seconds`` (not included in ``train_seconds``).  DyRep's hooks run every step
    before the optimizer step (saliency) and after each epoch's training pass (adjustment,
    counted in ``train_seconds``); after a change of parameters the model is re-wrapped in
    DistributedDataParallel.

    Under ``torchrun`` (a default process group with N > 1 ranks; see
    :mod:`~gradshape.harness.launch`) the model is wrapped in ``DistributedDataParallel``,
    each rank trains on its ``DistributedSampler`` share of every global batch, the history's
    loss and accuracy are the all-ranks figures, and rank 0 alone writes files and progress.

    Args:
        cfg: the run's configuration.
        out_dir: the run folder.
        resume: continue from ``out_dir/checkpoint.pt`` (a finished run returns its record).
        overwrite: replace a run already in ``out_dir``.
        progress: show a progress bar (tqdm, if installed) or a line per epoch on stderr.
        logger: ``"tensorboard"``: write per-epoch scalars and the G heatmaps to
            ``out_dir/tensorboard`` while training (see :mod:`~.tracking`); ``None``: no
            tracking.

    Raises ``ValueError`` when ``resume`` finds the folder started with other settings (the
    message names the differing keys), :class:`RunExistsError` for a used folder without
    ``resume`` or ``overwrite``.
    """
    out_dir = Path(out_dir)
    main = is_main_process()
    record_path, ckpt_path = out_dir / RUN_RECORD, out_dir / CHECKPOINT
    with fail_together("train_run: setting up the run"):
        check_logger(logger)
        parts, cfg = resolve_method(cfg)
        if main:
            prepare_run_dir(out_dir, resume=resume, overwrite=overwrite)
            saved = _saved_config(out_dir) if resume else None
            if saved is not None:
                _check_same_settings(saved[0], cfg, saved[1])
            write_config_file(out_dir / CONFIG_FILE, cfg.to_dict())
    if resume and record_path.exists():
        return json.loads(record_path.read_text())
    search = next((p.search for p in parts if p.search is not None), None)
    search_record = None
    if search is not None and not _setting(cfg, search.config_key):
        cfg, search_record = _search_stage(
            cfg, search, out_dir, resume, overwrite, progress, logger
        )
    device = device_for_rank(resolve_device(cfg.device))
    amp = device.type == "cuda" if cfg.amp is None else cfg.amp
    if amp and device.type != "cuda":
        raise ValueError(f"amp: mixed precision needs a CUDA device, this run uses {device}")
    with _deterministic(device):
        run = _Run(cfg, parts, device, amp, progress and main)
        if resume and ckpt_path.exists():
            run.restore(load_checkpoint(ckpt_path), ckpt_path)
        tracker = open_tracker(logger, out_dir, run.next_epoch + 1) if main else None
        try:
            for epoch in range(run.next_epoch, cfg.optim.epochs):
                refreshing = run.clock["refresh"]
                run.epoch(epoch)
                if main:
                    save_checkpoint(ckpt_path, run.checkpoint())
                if tracker is not None:
                    scaling = run.method.scaling
                    tracker.log_epoch(
                        run.history[-1],
                        run.clock["refresh"] - refreshing,
                        scaling.scalings if scaling is not None else None,
                    )
        finally:
            if tracker is not None:
                tracker.close()
        record = run.record(out_dir, main)
    if search_record is not None:
        record["search"] = {
            "method": search_record["method"],
            "folder": SEARCH_DIR,
            "epochs": search_record["epochs"],
            "train_seconds": search_record["train_seconds"],
            "test_acc": search_record["test_acc"],
        }
        record["search_seconds"] = search_record["train_seconds"]
    if main:
        _write_json(record_path, record)
    return record


def _setting(cfg: RunConfig, key: str) -> Any:
    section, name = key.split(".", 1)
    return getattr(getattr(cfg, section), name)


def _search_stage(
    cfg: RunConfig,
    stage: SearchStage,
    out_dir: Path,
    resume: bool,
    overwrite: bool,
    progress: bool,
    logger: str | None,
) -> tuple[RunConfig, dict[str, Any]]:
    """Train ``stage.method`` in ``out_dir/search`` (same data, model, optimizer and seed;
    ``stage.epochs_key`` epochs, or half the run's) and point ``stage.config_key`` at the file
    it wrote.  Returns the updated config and the search run's record."""
    epochs = _setting(cfg, stage.epochs_key) or max(1, cfg.optim.epochs // 2)
    search_cfg = dataclasses.replace(
        cfg, method=stage.method, optim=dataclasses.replace(cfg.optim, epochs=epochs)
    )
    folder = out_dir / SEARCH_DIR
    record = train_run(
        search_cfg, folder, resume=resume, overwrite=overwrite, progress=progress, logger=logger
    )
    return apply_override(cfg, stage.config_key, str(folder / stage.output)), record


class _Run:
    """The state of one run between epochs, and the steps that advance it."""

    def __init__(
        self,
        cfg: RunConfig,
        parts: tuple[MethodInfo, ...],
        device: torch.device,
        amp: bool,
        progress: bool,
    ) -> None:
        d, o = cfg.data, cfg.optim
        self.cfg, self.parts, self.device, self.amp = cfg, parts, device, amp
        rank, self.world = rank_and_world()
        if o.batch_size % self.world:
            raise ValueError(
                f"optim.batch_size {o.batch_size} is the global batch and must divide among "
                f"{self.world} ranks"
            )
        _seed_everything(cfg.seed)
        data = load_dataset(
            d.dataset,
            d.path,
            subset=d.subset,
            augment=d.augment,
            pad_to=d.pad_to,
            val_fraction=d.val_fraction,
            seed=cfg.seed,
            image_size=d.image_size,
        )
        model = create_model(
            cfg.model.name,
            num_classes=data.num_classes,
            in_channels=data.in_channels,
            width=cfg.model.width,
            drop_last_pool=cfg.model.drop_last_pool,
        ).to(device)
        self.method = build_method(model, cfg, lambda m: make_optimizer(m, cfg))
        self.model = self.method.model
        self.method.loss_fn.to(device)
        self.forward_model: nn.Module = self.model
        self._wrap()
        workers, eval_size = d.num_workers, max(256, 2 * o.batch_size)
        self.sampler = None
        if self.world > 1:
            self.sampler = torch.utils.data.DistributedSampler(
                data.train, num_replicas=self.world, rank=rank, shuffle=True, seed=cfg.seed
            )
        self.train_loader = make_loader(
            data.train,
            o.batch_size // self.world,
            shuffle=True,
            seed=cfg.seed,
            num_workers=workers,
            sampler=self.sampler,
        )
        self.test_loader = make_loader(
            data.test, eval_size, shuffle=False, seed=cfg.seed, num_workers=workers
        )
        self.fit_loader = make_loader(
            without_augmentation(data.train),
            eval_size,
            shuffle=False,
            seed=cfg.seed,
            num_workers=workers,
        )
        self.val_loader = None
        if data.val is not None:
            self.val_loader = make_loader(
                data.val, eval_size, shuffle=False, seed=cfg.seed, num_workers=workers
            )
        self.generator = getattr(self.train_loader, "generator", None)
        steps = len(self.train_loader)
        total = o.epochs * steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.method.optimizer, WarmupCosine(total, min(total, round(o.warmup_epochs * steps)))
        )
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp)
        self.history: list[dict[str, Any]] = []
        self.clock = {"train": 0.0, "refresh": 0.0, "eval": 0.0}
        self.next_epoch = 0
        self.bar = _Progress(progress, f"{cfg.method} seed{cfg.seed}")
        # The training stream starts from the same state for every method: a structural
        # conversion draws random numbers for its branches, which must not shift augmentation.
        _seed_everything(cfg.seed + 1)

    def _wrap(self) -> None:
        """(Re-)wrap the model in DistributedDataParallel, after a change of its parameters."""
        if self.world > 1:
            device = self.device
            ids = [device.index] if device.type == "cuda" else None
            self.forward_model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)

    def restore(self, ckpt: dict[str, Any], source: Path) -> None:
        _check_same_settings(ckpt["config"], self.cfg, source)
        # first: a method that changed the model's structure (DyRep) rebuilds it, and the
        # optimizer's groups, so that the model and optimizer states load strictly
        self.method.load_state_dict(ckpt["method"])
        self.model.load_state_dict(ckpt["model"])
        self.method.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        if self.method.epoch_end_hooks:
            self._wrap()
        _set_rng_state(ckpt["rng"], self.generator)
        self.history, self.clock = list(ckpt["history"]), dict(ckpt["clock"])
        self.next_epoch = ckpt["epoch"] + 1

    def checkpoint(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "epoch": self.next_epoch - 1,
            "config": self.cfg.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.method.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "method": self.method.state_dict(),
            "rng": _rng_state(self.generator),
            "history": self.history,
            "clock": self.clock,
        }

    def epoch(self, epoch: int) -> None:
        """Epoch hooks (SGS refresh), one training pass, evaluation; appends to history."""
        epochs, device = self.cfg.optim.epochs, self.device
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        refreshed = any([hook(epoch, self.train_loader) for hook in self.method.epoch_hooks])
        t1 = time.perf_counter()
        self.bar.start(epoch, epochs, len(self.train_loader))
        lr = self.method.optimizer.param_groups[0]["lr"]
        loss, acc, seen = _train_epoch(
            self.method,
            self.forward_model,
            self.train_loader,
            device,
            self.amp,
            self.scaler,
            self.scheduler,
            self.bar,
        )
        if any([hook(epoch, self.train_loader) for hook in self.method.epoch_end_hooks]):
            self._wrap()
        if self.world > 1:
            loss, acc, seen = _all_ranks(loss, acc, seen, device)
            check_in_sync(self.model, f"{self.cfg.method} epoch {epoch}")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t2 = time.perf_counter()
        val_acc = test_acc = None
        every = self.cfg.eval_every
        if epoch == epochs - 1 or (every and (epoch + 1) % every == 0):
            if self.val_loader is not None:
                val_acc = evaluate(self.model, self.val_loader, device, amp=self.amp)
            test_acc = evaluate(self.model, self.test_loader, device, amp=self.amp)
        self.clock["refresh"] += t1 - t0
        self.clock["train"] += t2 - t0
        self.clock["eval"] += time.perf_counter() - t2
        speed = seen / max(t2 - t1, 1e-9)
        self.history.append(
            {
                "epoch": epoch,
                "train_loss": loss,
                "train_acc": acc,
                "val_acc": val_acc,
                "test_acc": test_acc,
                "seconds": t2 - t0,
                "lr": lr,
                "images": seen,
                "images_per_second": speed,
                "refreshed": refreshed,
            }
        )
        self.next_epoch = epoch + 1
        self.bar.end(
            f"epoch {epoch + 1}/{epochs}: loss {loss:.4f}, train {acc:.2%}, "
            + (f"val {val_acc:.2%}, " if val_acc is not None else "")
            + (f"test {test_acc:.2%}, " if test_acc is not None else "")
            + f"{t2 - t0:.1f} s, {speed:.0f} img/s"
            + (" (G refreshed)" if refreshed else "")
        )

    def record(self, out_dir: Path, writes: bool) -> dict[str, Any]:
        """The run record: final accuracies (the fused model's for structural methods), sizes,
        and the entries of the method's record hooks (which may write beside the run)."""
        cfg, device, amp = self.cfg, self.device, self.amp
        model = self.model
        deployed = self.method.deploy(model)
        last = self.history[-1]
        test_acc, val_acc = last["test_acc"], last["val_acc"]
        fusion: dict[str, Any] = {}
        if deployed is not model:
            fusion = self._fusion_check(deployed, test_acc)
            test_acc = evaluate(deployed, self.test_loader, device, amp=amp)
            if self.val_loader is not None:
                val_acc = evaluate(deployed, self.val_loader, device, amp=amp)
        train_eval_acc = evaluate(deployed, self.fit_loader, device, amp=amp)
        extra: dict[str, Any] = {}
        for hook in self.method.record_hooks:
            extra.update(hook(out_dir, writes))
        return {
            "method": cfg.method,
            "seed": cfg.seed,
            "k": cfg.sgs.k if any(p.uses_k for p in self.parts) else None,
            "flags": {
                flag: any(getattr(p, flag) for p in self.parts)
                for flag in ("needs_refresh", "structural", "loss_transform", "param_transform")
            },
            "config": cfg.to_dict(),
            "test_acc": test_acc,
            "val_acc": val_acc,
            "train_eval_acc": train_eval_acc,
            **fusion,
            "train_seconds": self.clock["train"],
            "refresh_seconds": self.clock["refresh"],
            "eval_seconds": self.clock["eval"],
            "params": parameter_count(model),
            "params_deployed": parameter_count(deployed),
            "epochs": len(self.history),
            "history": self.history,
            "scalings": _scaling_record(self.method),
            "kernel_magnitude": kernel_magnitude(deployed),
            "device": str(device),
            "world_size": self.world,
            "amp": amp,
            "torch_version": torch.__version__,
            **extra,
        }

    def _fusion_check(self, deployed: nn.Module, unfused_acc: float) -> dict[str, Any]:
        """Max |Δlogits| between the trained and the fused model on one test batch (float32)."""
        x, _ = next(iter(self.test_loader))
        x = x.to(self.device)
        diff = reparam.max_output_difference(self.model, deployed, x)
        scale = float(_logits(self.model, x).abs().max())
        ok = diff <= 1e-4 * (1.0 + scale)
        if not ok:
            warnings.warn(
                f"{self.cfg.method}: the fused model differs from the trained one by {diff:.3g} "
                f"(logit scale {scale:.3g})",
                RuntimeWarning,
                stacklevel=3,
            )
        return {"test_acc_unfused": unfused_acc, "fusion_max_abs_diff": diff, "fusion_ok": ok}


@torch.no_grad()
def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        return model(x).float()
    finally:
        for m, training in flags:
            m.training = training
