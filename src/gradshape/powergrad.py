r"""PowerGrad Transform (PGT): cross-entropy whose backward uses a power-flattened softmax.

Reference: Das, Mondal, Lall, Joshi, Dutta Roy, "Altering Backward Pass Gradients improves
Convergence" (earlier "Softmax Gradient Tampering"), arXiv 2111.12495.

:func:`powergrad_cross_entropy` is the functional form; :class:`PowerGrad` the loss module.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .transform import GradientTransform

__all__ = ["REDUCTIONS", "PowerGrad", "powergrad_cross_entropy"]

REDUCTIONS = ("mean", "sum", "none")


def _check_alpha(alpha: float, allow_sharpen: bool, owner: str) -> float:
    if isinstance(alpha, torch.Tensor):
        raise TypeError(
            f"{owner}: alpha must be a real number, got a Tensor (the first argument is the "
            "power α, not nn.CrossEntropyLoss's class weight; class weights are not supported)"
        )
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"{owner}: alpha must be a real number, got {type(alpha).__name__}")
    if not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"{owner}: alpha must be finite and > 0, got {alpha}")
    if alpha > 1 and not allow_sharpen:
        raise ValueError(
            f"{owner}: alpha = {alpha} > 1 sharpens the softmax, outside the paper's range "
            "0 < alpha <= 1; pass allow_sharpen=True to use it anyway"
        )
    return float(alpha)


def _check_smoothing(label_smoothing: float, owner: str) -> float:
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, numbers.Real):
        raise TypeError(f"{owner}: label_smoothing must be a real number")
    if not 0 <= label_smoothing < 1:
        raise ValueError(f"{owner}: label_smoothing must lie in [0, 1), got {label_smoothing}")
    return float(label_smoothing)


def _check_ignore_index(ignore_index: int, owner: str) -> int:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"{owner}: ignore_index must be an int, got {type(ignore_index).__name__}")
    return int(ignore_index)


def _refuse_unsupported(
    owner: str, weight: torch.Tensor | None, size_average: bool | None, reduce: bool | None
) -> None:
    """nn.CrossEntropyLoss's arguments PowerGrad does not take, refused by name."""
    if weight is not None:
        raise ValueError(
            f"{owner}: weight (CrossEntropyLoss's per-class weights) is not supported; leave it "
            "None, or use nn.CrossEntropyLoss(weight=...) without PowerGrad"
        )
    for label, value in (("size_average", size_average), ("reduce", reduce)):
        if value is not None:
            raise ValueError(
                f"{owner}: {label} (deprecated in torch) is not supported; use reduction="
                "'mean', 'sum' or 'none'"
            )


def _check_inputs(
    logits: torch.Tensor, target: torch.Tensor, reduction: str, ignore_index: int
) -> None:
    owner = "powergrad_cross_entropy"
    if reduction not in REDUCTIONS:
        raise ValueError(f"{owner}: unknown reduction {reduction!r}; expected one of {REDUCTIONS}")
    if not isinstance(logits, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError(f"{owner}: logits and target must be tensors")
    if not logits.is_floating_point():
        raise TypeError(f"{owner}: logits must be floating point, got {logits.dtype}")
    if logits.dim() < 2:
        raise ValueError(
            f"{owner}: logits must be (N, C) or (N, C, d1, ...), got shape {tuple(logits.shape)}"
        )
    if target.is_floating_point():
        if target.shape != logits.shape:
            raise ValueError(
                f"{owner}: class-probability target of shape {tuple(target.shape)} does not "
                f"match logits of shape {tuple(logits.shape)}"
            )
        if ignore_index >= 0:
            raise ValueError(
                f"{owner}: ignore_index = {ignore_index} with a class-probability target: it "
                "applies to class indices only (torch's cross_entropy refuses a non-negative "
                "one here); leave it at -100"
            )
        return
    expected = (logits.shape[0], *logits.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(
            f"{owner}: class-index target of shape {tuple(target.shape)} does not fit logits of "
            f"shape {tuple(logits.shape)} (expected target shape {expected})"
        )
    if target.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(
            f"{owner}: class-index target must be an integer tensor, got {target.dtype}"
        )
    kept = target[target != ignore_index]
    if kept.numel():
        low, high = int(kept.min()), int(kept.max())
        classes = logits.shape[1]
        if low < 0 or high >= classes:
            bad = low if low < 0 else high
            raise ValueError(
                f"{owner}: target holds class index {bad}, outside [0, {classes}) for logits "
                f"with C = {classes} classes (and not ignore_index = {ignore_index})"
            )


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float32 if logits.dtype in (torch.float16, torch.bfloat16) else logits.dtype


def _target_distribution(
    target: torch.Tensor, like: torch.Tensor, label_smoothing: float
) -> torch.Tensor:
    """q: the (smoothed) target distribution, shaped and typed like ``like`` (N, C, ...)."""
    classes = like.shape[1]
    if target.is_floating_point():
        q = target.to(like.dtype)
        return q * (1 - label_smoothing) + label_smoothing / classes if label_smoothing else q
    q = torch.full_like(like, label_smoothing / classes)
    return q.scatter_(
        1, target.long().unsqueeze(1), 1 - label_smoothing + label_smoothing / classes
    )


class _PowerGradCE(torch.autograd.Function):
    """Forward: F.cross_entropy.  Backward: (softmax(α z)·Σq − q) · grad_output / B on the
    kept predictions (B of them), zero on the ignored ones."""

    @staticmethod
    def forward(ctx, logits, target, alpha, label_smoothing, reduction, ignore_index):
        z = logits.to(_compute_dtype(logits))
        tgt = target.to(z.dtype) if target.is_floating_point() else target.long()
        loss = F.cross_entropy(
            z,
            tgt,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            reduction=reduction,
        )
        ctx.save_for_backward(logits, target)
        ctx.alpha, ctx.label_smoothing, ctx.reduction = alpha, label_smoothing, reduction
        ctx.ignore_index = ignore_index
        return loss.to(logits.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        logits, target = ctx.saved_tensors
        z = logits.to(_compute_dtype(logits))
        p = torch.softmax(ctx.alpha * z, dim=1)
        if target.is_floating_point():
            q = _target_distribution(target, z, ctx.label_smoothing)
            # Σ_c q_c = 1 for a distribution; kept so that α = 1 is CE's gradient for any target.
            grad = p * q.sum(1, keepdim=True) - q
            count = z.numel() // z.shape[1]
        else:
            kept = target != ctx.ignore_index
            q = _target_distribution(target.where(kept, 0), z, ctx.label_smoothing)
            grad = (p - q) * kept.unsqueeze(1)
            # all ignored: "mean" is 0/0 = nan in the forward, its gradient 0 (as torch's);
            # a tensor, so that the backward does not wait for the device
            count = kept.sum().clamp(min=1)
        g = grad_output.to(z.dtype)
        if ctx.reduction == "mean":
            grad = grad * (g / count)
        elif ctx.reduction == "sum":
            grad = grad * g
        else:
            grad = grad * g.unsqueeze(1)
        return grad.to(logits.dtype), None, None, None, None, None


def powergrad_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    alpha: float = 0.25,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    allow_sharpen: bool = False,
    weight: torch.Tensor | None = None,
    size_average: bool | None = None,
    reduce: bool | None = None,
) -> torch.Tensor:
    r"""Cross-entropy whose gradient w.r.t. the logits uses ``softmax(α z)`` instead of
    ``softmax(z)`` (PowerGrad Transform, Das et al., arXiv 2111.12495).

    Forward: exactly ``F.cross_entropy(logits, target, ignore_index=..., label_smoothing=s,
    reduction=...)``.  Backward, with ``p̃ = softmax(α z)`` along dim 1
    (``p̃_c = p_c^α / Σ_j p_j^α``) and the target distribution
    ``q = (1 − s)·onehot(target) + s/C`` (for probability targets, ``q = (1 − s)·target + s/C``,
    as F.cross_entropy smooths them):

    .. math::  \partial L / \partial z_i = (\tilde p_i - q_i) \cdot w_i

    for every prediction ``i`` whose target is not ``ignore_index``, and 0 for the ignored
    ones, with ``w = grad_output / B`` for ``"mean"`` (B = number of kept predictions, as
    ``nn.CrossEntropyLoss`` averages), ``grad_output`` for ``"sum"`` and ``grad_output[i]``
    per prediction for ``"none"`` (where an ignored prediction's loss is 0); the incoming
    gradient is honoured, so AMP loss scaling and gradient accumulation stay exact.  A batch
    whose targets are all ignored gives torch's results: a ``nan`` mean (0/0) with a zero
    gradient, a zero sum.  (For probability targets that do not sum to 1 the first term is
    ``p̃·Σq``, so that ``α = 1`` is CE's gradient for every target.)

    Args:
        logits: ``(N, C)`` or ``(N, C, d1, ...)``, floating point; half/bfloat16 are computed
            in float32 (the loss is returned in the logits' dtype).
        target: class indices ``(N,)``/``(N, d1, ...)`` in ``[0, C)`` or equal to
            ``ignore_index``, or class probabilities of the logits' shape (where, as in torch,
            ``ignore_index`` plays no part and must be negative).  No gradient flows to the
            target.
        alpha: the power α; ``0 < α ≤ 1`` (α = 1: plain cross-entropy; the paper uses 0.25 for
            ResNet-18, 0.3 for ResNet-50).  ``α > 1`` needs ``allow_sharpen=True``.
        ignore_index: the class index whose predictions count for nothing (default -100, as
            ``nn.CrossEntropyLoss``'s).
        label_smoothing: s in ``[0, 1)``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        weight, size_average, reduce: ``F.cross_entropy``'s class weights and deprecated
            reduction flags, not supported: anything but ``None`` raises ``ValueError``.

    Not twice differentiable.
    """
    owner = "powergrad_cross_entropy"
    _refuse_unsupported(owner, weight, size_average, reduce)
    alpha = _check_alpha(alpha, allow_sharpen, owner)
    ignore_index = _check_ignore_index(ignore_index, owner)
    label_smoothing = _check_smoothing(label_smoothing, owner)
    _check_inputs(logits, target, reduction, ignore_index)
    return _PowerGradCE.apply(logits, target, alpha, label_smoothing, reduction, ignore_index)


class PowerGrad(nn.Module, GradientTransform):
    r"""PowerGrad Transform loss (Das, Mondal, Lall, Joshi, Dutta Roy, "Altering Backward Pass
    Gradients improves Convergence", arXiv 2111.12495).

    A drop-in for ``nn.CrossEntropyLoss``: the loss value is the ordinary (label-smoothed)
    cross-entropy, but its gradient w.r.t. the logits ``z`` is ``(softmax(α z) − q)·w`` instead
    of ``(softmax(z) − q)·w``: the backward sees the power-flattened distribution
    ``p̃_c = p_c^α / Σ_j p_j^α``.  See :func:`powergrad_cross_entropy` for ``q``, ``w``, shapes
    and dtypes.

    Args:
        alpha: the power α (``0 < α ≤ 1``; the paper: 0.25 for ResNet-18, 0.3 for ResNet-50).
        ignore_index: targets equal to it count for nothing (default -100, as
            ``nn.CrossEntropyLoss``'s); ``"mean"`` averages over the others.
        label_smoothing: s in ``[0, 1)``; the paper combines PGT with s = 0.1.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        allow_sharpen: permit α > 1 (a sharpened backward, outside the paper).
        weight, size_average, reduce: ``nn.CrossEntropyLoss``'s class weights and deprecated
            reduction flags, not supported: anything but ``None`` raises ``ValueError``.

    The transform acts whenever the module is in training mode (the default) and autograd
    records the loss; in ``.eval()`` mode, and at α = 1, the module calls ``F.cross_entropy``
    itself, so both forward and backward are plain cross-entropy bit for bit.  The forward
    value never changes.  ``alpha`` and ``label_smoothing`` are saved by ``state_dict()`` (as
    the module's extra state, so a PowerGrad inside a model is checkpointed with it) and
    checked by ``load_state_dict``.  The loss holds no hooks: :meth:`remove` is a no-op.

    Example:

        >>> import torch
        >>> from gradshape.powergrad import PowerGrad
        >>> criterion = PowerGrad(alpha=0.25, label_smoothing=0.1)
        >>> logits = torch.randn(4, 10, requires_grad=True)
        >>> loss = criterion(logits, torch.tensor([1, 0, 9, 3]))
        >>> loss.backward()  # logits.grad = (softmax(0.25 * logits) - q) / 4
    """

    def __init__(
        self,
        alpha: float = 0.25,
        *,
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
        reduction: str = "mean",
        allow_sharpen: bool = False,
        weight: torch.Tensor | None = None,
        size_average: bool | None = None,
        reduce: bool | None = None,
    ) -> None:
        super().__init__()
        _refuse_unsupported("PowerGrad", weight, size_average, reduce)
        if reduction not in REDUCTIONS:
            raise ValueError(
                f"PowerGrad: unknown reduction {reduction!r}; expected one of {REDUCTIONS}"
            )
        self.allow_sharpen = bool(allow_sharpen)
        self.alpha = _check_alpha(alpha, self.allow_sharpen, "PowerGrad")
        self.label_smoothing = _check_smoothing(label_smoothing, "PowerGrad")
        self.ignore_index = _check_ignore_index(ignore_index, "PowerGrad")
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.training and self.alpha != 1:
            return powergrad_cross_entropy(
                logits,
                target,
                self.alpha,
                ignore_index=self.ignore_index,
                label_smoothing=self.label_smoothing,
                reduction=self.reduction,
                allow_sharpen=self.allow_sharpen,
            )
        _check_inputs(logits, target, self.reduction, self.ignore_index)
        return F.cross_entropy(
            logits,
            target,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            reduction=self.reduction,
        )

    def get_extra_state(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "label_smoothing": self.label_smoothing}

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, dict) or {"alpha", "label_smoothing"} - set(state):
            raise ValueError(
                "PowerGrad.load_state_dict: expected extra state {'alpha', 'label_smoothing'}, "
                f"got {state!r}"
            )
        alpha = _check_alpha(state["alpha"], self.allow_sharpen, "PowerGrad.load_state_dict")
        smoothing = _check_smoothing(state["label_smoothing"], "PowerGrad.load_state_dict")
        self.alpha, self.label_smoothing = alpha, smoothing

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, label_smoothing={self.label_smoothing}, "
            f"reduction={self.reduction!r}, ignore_index={self.ignore_index}"
        )
