"""Lightning callbacks for gradshape transforms (``pip install 'gradshape[lightning]'``).

Thin adapters over the objects of the plain-loop API, so a ``lightning.Trainer`` run changes
the update exactly as the hand-written loop does:

* :class:`TransformCallback` builds any gradshape transform from the ``LightningModule`` at
  ``on_fit_start`` (the optimizers exist by then), checkpoints its ``state_dict`` with the
  trainer's checkpoints, and removes it when the fit ends or fails, leaving the module as it
  was.
* :class:`SGSCallback` does that for :class:`~gradshape.SpatialGradientScaling` and refreshes
  the scalings at ``on_train_epoch_start`` on the schedule, from ``trainer.train_dataloader``.

Where the work happens: in ``mode="gradient"`` SGS's tensor hooks scale each micro-batch's
gradient during ``backward``, so Lightning's ``accumulate_grad_batches``, AMP loss scaling,
DDP averaging and ``gradient_clip_val`` (applied after backward) all see ``G ⊙ g``; in
``mode="update"`` the optimizer's step hooks rescale the step of ``trainer.optimizers[0]``,
inside Lightning's ``optimizer.step(closure)``.  Under a distributed strategy every rank runs
the refresh (a collective, see :mod:`gradshape.distributed`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

try:
    from lightning.pytorch import Callback, LightningModule, Trainer
except ImportError as exc:  # pragma: no cover - exercised by a test that hides lightning
    raise ImportError(
        "gradshape.integrations.lightning needs Lightning 2.x: pip install 'gradshape[lightning]'"
    ) from exc

from ..dependence import MEASURES
from ..scaling import _check_k
from ..spatial import RefreshSchedule, SpatialGradientScaling
from ..transform import MODES, GradientTransform

__all__ = ["SGSCallback", "TransformCallback"]


class TransformCallback(Callback):
    """Attach ``factory(pl_module)`` for the duration of each ``fit``.

    Args:
        factory: called with the ``LightningModule`` at ``on_fit_start``; returns a gradshape
            transform (for instance ``lambda m: gs.ChannelDirectedGradients(m)``).  A factory
            for ``mode="update"`` finds the optimizer in ``m.trainer.optimizers``.
        name: distinguishes the checkpoint entries (:attr:`state_key`) of several instances;
            defaults to the factory's ``__qualname__``.

    Attributes:
        transform: the transform of the current or last fit (``None`` before the first).

    The transform's state is saved in the trainer's checkpoints and restored on
    ``trainer.fit(ckpt_path=...)``; a second ``fit`` with the same callback carries the first
    fit's state over.
    """

    def __init__(
        self, factory: Callable[[LightningModule], GradientTransform], *, name: str | None = None
    ) -> None:
        if not callable(factory):
            raise TypeError(
                f"{type(self).__name__}: factory must be callable (module -> transform), "
                f"got {type(factory).__name__}"
            )
        if name is not None and not isinstance(name, str):
            raise TypeError(f"{type(self).__name__}: name must be a str, got {type(name).__name__}")
        self.factory = factory
        self.name = name or getattr(factory, "__qualname__", type(factory).__name__)
        self.transform: GradientTransform | None = None
        self._pending: dict[str, Any] | None = None  # state waiting for the next transform
        self._fitting = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.transform is not None and self._pending is None:
            self._pending = self.transform.state_dict()
        transform = self.factory(pl_module)
        if not isinstance(transform, GradientTransform):
            raise TypeError(
                f"{type(self).__name__} {self.name!r}: the factory returned "
                f"{type(transform).__name__}, not a gradshape transform"
            )
        self.transform = transform
        self._fitting = True
        if self._pending is not None:
            transform.load_state_dict(self._pending)
            self._pending = None

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._detach()

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        self._detach()  # an interrupted fit skips teardown: leave no hooks on the module

    def _detach(self) -> None:
        if self.transform is not None:
            self.transform.remove()
        self._fitting = False

    def state_dict(self) -> dict[str, Any]:
        if self._pending is not None:
            return dict(self._pending)
        return {} if self.transform is None else self.transform.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        # Lightning restores callbacks before on_fit_start for most strategies: keep the state
        # until the transform exists.
        if self._fitting:
            self.transform.load_state_dict(state_dict)
        else:
            self._pending = dict(state_dict)


class SGSCallback(TransformCallback):
    """Spatial Gradient Scaling in a Lightning fit, refreshed on the paper's schedule.

    At the start of every training epoch, :meth:`SpatialGradientScaling.maybe_refresh` runs with
    ``trainer.current_epoch`` and ``trainer.train_dataloader``: from a ``DataLoader`` it measures
    ``schedule.batches`` randomly drawn batches (under DDP shared between the ranks), so the G
    equals the plain loop's for the same seed.

    Args:
        k, measure, mode, schedule: as for :class:`~gradshape.SpatialGradientScaling`; in
            ``mode="update"`` the steps of ``trainer.optimizers[0]`` are rescaled.
        submodule: attach to ``pl_module.get_submodule(submodule)`` instead of the whole
            ``LightningModule``; the refresh feeds each batch's input to that module.
        log_scalings: after each refresh, log ``{prefix}/{layer}/min`` and ``.../max`` of G with
            ``pl_module.log_dict``.
        log_prefix: the prefix of those keys.
        name: as for :class:`TransformCallback` (default ``"sgs"``, or ``"sgs:<submodule>"``).
        **kwargs: passed to :class:`~gradshape.SpatialGradientScaling` (``include``,
            ``exclude``, ``diag_removal``, ``floor``, ``seed``, ``engine``).

    Example::

        trainer = lightning.Trainer(max_epochs=600, callbacks=[SGSCallback(k=5.0)])
        trainer.fit(module, train_loader)
    """

    def __init__(
        self,
        k: float = 5.0,
        measure: str = "nmi",
        mode: str = "gradient",
        schedule: RefreshSchedule | None = None,
        *,
        submodule: str | None = None,
        log_scalings: bool = False,
        log_prefix: str = "sgs",
        name: str | None = None,
        **kwargs: Any,
    ) -> None:
        _check_k(k)
        if measure not in MEASURES:
            raise ValueError(
                f"SGSCallback: unknown measure {measure!r}; expected one of {MEASURES}"
            )
        if mode not in MODES:
            raise ValueError(f"SGSCallback: unknown mode {mode!r}; expected one of {MODES}")
        if schedule is not None and not isinstance(schedule, RefreshSchedule):
            raise TypeError("SGSCallback: schedule must be a gradshape.RefreshSchedule")
        for reserved in ("model", "optimizer"):
            if reserved in kwargs:
                raise TypeError(
                    f"SGSCallback: {reserved}= is taken from the trainer; use submodule= to pick "
                    "part of the LightningModule"
                )
        self.k, self.measure, self.mode, self.schedule = k, measure, mode, schedule
        self.submodule = submodule
        self.log_scalings = bool(log_scalings)
        self.log_prefix = log_prefix
        self.kwargs = kwargs
        default = "sgs" if submodule is None else f"sgs:{submodule}"
        super().__init__(self._build, name=name or default)

    def _build(self, pl_module: LightningModule) -> SpatialGradientScaling:
        model = pl_module if self.submodule is None else pl_module.get_submodule(self.submodule)
        optimizer = None
        if self.mode == "update":
            optimizers = pl_module.trainer.optimizers
            if not optimizers:
                raise ValueError("SGSCallback(mode='update'): the trainer has no optimizer")
            optimizer = optimizers[0]
        return SpatialGradientScaling(
            model,
            self.k,
            self.measure,
            mode=self.mode,
            optimizer=optimizer,
            schedule=self.schedule,
            **self.kwargs,
        )

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        loader = trainer.train_dataloader
        if isinstance(loader, (Mapping, list, tuple)):  # Lightning's CombinedLoader iterables
            raise TypeError(
                "SGSCallback refreshes from one training DataLoader; this trainer has "
                f"{type(loader).__name__} of loaders (refresh by hand with sgs.refresh(...))"
            )
        sgs = self.transform
        if sgs.maybe_refresh(trainer.current_epoch, loader) and self.log_scalings:
            summary = {}
            for layer, g in sgs.scalings.items():
                summary[f"{self.log_prefix}/{layer or 'model'}/min"] = float(g.min())
                summary[f"{self.log_prefix}/{layer or 'model'}/max"] = float(g.max())
            pl_module.log_dict(summary, on_step=False, on_epoch=True)
