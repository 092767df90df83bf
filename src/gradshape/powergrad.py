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


def _check_inputs(logits: torch.Tensor, target: torch.Tensor, reduction: str) -> None:
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
    if target.numel():
        low, high = int(target.min()), int(target.max())
        classes = logits.shape[1]
        if low < 0 or high >= classes:
            bad = low if low < 0 else high
            raise ValueError(
                f"{owner}: target holds class index {bad}, outside [0, {classes}) for logits "
                f"with C = {classes} classes"
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
    """Forward: F.cross_entropy.  Backward: (softmax(α z)·Σq − q) · grad_output · (1/B)."""

    @staticmethod
    def forward(ctx, logits, target, alpha, label_smoothing, reduction):
        z = logits.to(_compute_dtype(logits))
        tgt = target.to(z.dtype) if target.is_floating_point() else target.long()
        loss = F.cross_entropy(z, tgt, label_smoothing=label_smoothing, reduction=reduction)
        ctx.save_for_backward(logits, target)
        ctx.alpha, ctx.label_smoothing, ctx.reduction = alpha, label_smoothing, reduction
        return loss.to(logits.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        logits, target = ctx.saved_tensors
        z = logits.to(_compute_dtype(logits))
        q = _target_distribution(target, z, ctx.label_smoothing)
        p = torch.softmax(ctx.alpha * z, dim=1)
        # Σ_c q_c = 1 for a distribution; kept so that α = 1 equals CE's gradient for any target.
        grad = p * q.sum(1, keepdim=True) - q if target.is_floating_point() else p - q
        g = grad_output.to(z.dtype)
        if ctx.reduction == "mean":
            grad = grad * (g / (z.numel() // z.shape[1]))
        elif ctx.reduction == "sum":
            grad = grad * g
        else:
            grad = grad * g.unsqueeze(1)
        return grad.to(logits.dtype), None, None, None, None


def powergrad_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    alpha: float = 0.25,
    *,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    allow_sharpen: bool = False,
) -> torch.Tensor:
    r"""Cross-entropy whose gradient w.r.t. the logits uses ``softmax(α z)`` instead of
    ``softmax(z)`` (PowerGrad Transform, Das et al., arXiv 2111.12495).

    Forward: exactly ``F.cross_entropy(logits, target, label_smoothing=s, reduction=...)``.
    Backward, with ``p̃ = softmax(α z)`` along dim 1 (``p̃_c = p_c^α / Σ_j p_j^α``) and the
    target distribution ``q = (1 − s)·onehot(target) + s/C`` (for probability targets,
    ``q = (1 − s)·target + s/C``, as F.cross_entropy smooths them):

    .. math::  \partial L / \partial z = (\tilde p - q) \cdot w

    with ``w = grad_output / B`` for ``"mean"`` (B = number of predictions, N·d1·…),
    ``grad_output`` for ``"sum"`` and ``grad_output[i]`` per prediction for ``"none"``; the
    incoming gradient is honoured, so AMP loss scaling and gradient accumulation stay exact.
    (For probability targets that do not sum to 1 the first term is ``p̃·Σq``, so that
    ``α = 1`` is CE's gradient for every target.)

    Args:
        logits: ``(N, C)`` or ``(N, C, d1, ...)``, floating point; half/bfloat16 are computed
            in float32 (the loss is returned in the logits' dtype).
        target: class indices ``(N,)``/``(N, d1, ...)`` in ``[0, C)``, or class probabilities
            of the logits' shape.  No gradient flows to the target.
        alpha: the power α; ``0 < α ≤ 1`` (α = 1: plain cross-entropy; the paper uses 0.25 for
            ResNet-18, 0.3 for ResNet-50).  ``α > 1`` needs ``allow_sharpen=True``.
        label_smoothing: s in ``[0, 1)``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.  Class weights and ``ignore_index`` are
            not supported.

    Not twice differentiable.
    """
    owner = "powergrad_cross_entropy"
    alpha = _check_alpha(alpha, allow_sharpen, owner)
    label_smoothing = _check_smoothing(label_smoothing, owner)
    _check_inputs(logits, target, reduction)
    return _PowerGradCE.apply(logits, target, alpha, label_smoothing, reduction)


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
        label_smoothing: s in ``[0, 1)``; the paper combines PGT with s = 0.1.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        allow_sharpen: permit α > 1 (a sharpened backward, outside the paper).

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
        label_smoothing: float = 0.0,
        reduction: str = "mean",
        allow_sharpen: bool = False,
    ) -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(
                f"PowerGrad: unknown reduction {reduction!r}; expected one of {REDUCTIONS}"
            )
        self.allow_sharpen = bool(allow_sharpen)
        self.alpha = _check_alpha(alpha, self.allow_sharpen, "PowerGrad")
        self.label_smoothing = _check_smoothing(label_smoothing, "PowerGrad")
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.training and self.alpha != 1:
            return powergrad_cross_entropy(
                logits,
                target,
                self.alpha,
                label_smoothing=self.label_smoothing,
                reduction=self.reduction,
                allow_sharpen=self.allow_sharpen,
            )
        _check_inputs(logits, target, self.reduction)
        return F.cross_entropy(
            logits, target, label_smoothing=self.label_smoothing, reduction=self.reduction
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
            f"reduction={self.reduction!r}"
        )
