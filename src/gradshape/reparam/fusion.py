"""Pure kernel/bias maps that fold a multi-branch block into one K×K convolution.

Every function maps tensors to tensors (differentiable, on the inputs' device and dtype) and
implements one identity of structural reparameterization (Ding et al.: ACNet, ICCV 2019;
RepVGG and DBB, CVPR 2021).  Shapes: a conv kernel is ``(c_out, c_in / groups, kh, kw)`` and
a bias ``(c_out,)``; a missing bias (``None``) counts as zeros.

* :func:`batchnorm_affine`, :func:`fold_batchnorm`: conv then BatchNorm (eval mode) → one conv.
* :func:`pad_to_kernel`: a kh×kw kernel placed at the centre of a larger K×K one.
* :func:`identity_kernel`: the K×K kernel of the identity map.
* :func:`avg_pool_kernel`: the K×K kernel of average pooling.
* :func:`merge_sequential`: a 1×1 conv followed by a K×K conv → one K×K conv.
* :func:`add_branches`: parallel convs whose outputs are summed → one conv.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "add_branches",
    "avg_pool_kernel",
    "batchnorm_affine",
    "fold_batchnorm",
    "identity_kernel",
    "merge_sequential",
    "pad_to_kernel",
]

KernelBias = tuple[torch.Tensor, torch.Tensor]


def _bias_or_zeros(kernel: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if bias is None:
        return kernel.new_zeros(kernel.shape[0])
    return bias


def batchnorm_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """An eval-mode BatchNorm as ``y = scale · x + shift`` per channel.

    With ``σ = sqrt(running_var + eps)``, ``γ = bn.weight`` and ``β = bn.bias`` (1 and 0 when
    ``affine=False``): ``scale = γ/σ`` and ``shift = β − μ·γ/σ``, each of shape ``(C,)``.
    ``shift`` is also the BatchNorm's output for a zero input.

    Raises:
        ValueError: the BatchNorm keeps no running statistics (its eval output depends on the
            batch, so no fixed affine map equals it).
    """
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            f"{type(bn).__name__} has track_running_stats=False: its eval output uses batch "
            "statistics and cannot be folded into a conv"
        )
    scale = torch.rsqrt(bn.running_var + bn.eps)
    shift = -bn.running_mean * scale
    if bn.weight is not None:
        scale = scale * bn.weight
        shift = shift * bn.weight + bn.bias
    return scale, shift


def fold_batchnorm(
    kernel: torch.Tensor, bias: torch.Tensor | None, bn: nn.modules.batchnorm._BatchNorm
) -> KernelBias:
    """Fold an eval-mode BatchNorm into the conv before it:
    ``W' = W · γ/σ`` per output channel and ``b' = β + (b − μ) · γ/σ``
    (symbols as in :func:`batchnorm_affine`)."""
    if bn.num_features != kernel.shape[0]:
        raise ValueError(
            f"fold_batchnorm: {type(bn).__name__}({bn.num_features}) does not match a kernel "
            f"with {kernel.shape[0]} output channels"
        )
    scale, shift = batchnorm_affine(bn)
    new_kernel = kernel * scale.reshape(-1, *([1] * (kernel.dim() - 1)))
    return new_kernel, shift + _bias_or_zeros(kernel, bias) * scale


def pad_to_kernel(kernel: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Zero-pad a ``(.., kh, kw)`` kernel to ``size = (KH, KW)``, keeping it centred.

    A 1×K kernel lands on the centre row, a K×1 kernel on the centre column, a 1×1 kernel on
    the centre.  ``KH − kh`` and ``KW − kw`` must be even and non-negative.
    """
    kh, kw = kernel.shape[-2:]
    big_h, big_w = size
    dh, dw = big_h - kh, big_w - kw
    if dh < 0 or dw < 0 or dh % 2 or dw % 2:
        raise ValueError(
            f"pad_to_kernel: a {kh}×{kw} kernel cannot be centred in {big_h}×{big_w} "
            "(the size differences must be even and >= 0)"
        )
    return F.pad(kernel, (dw // 2, dw // 2, dh // 2, dh // 2))


def _diagonal(
    channels: int, groups: int, size: Sequence[int], dtype: torch.dtype | None, device: Any
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """A zero ``(C, C/groups, *size)`` kernel and the (output, input) index pairs where the
    output channel equals the input channel inside its group."""
    if groups < 1 or channels % groups:
        raise ValueError(f"{channels} channels do not split into {groups} groups")
    per_group = channels // groups
    kernel = torch.zeros(channels, per_group, *size, dtype=dtype, device=device)
    rows = torch.arange(channels, device=kernel.device)
    return kernel, (rows, rows % per_group)


def identity_kernel(
    channels: int,
    groups: int = 1,
    size: Sequence[int] = (3, 3),
    *,
    dtype: torch.dtype | None = None,
    device: Any = None,
) -> torch.Tensor:
    """The ``(C, C/groups, KH, KW)`` kernel of the identity: 1 at the centre where the output
    channel equals the input channel (per group), 0 elsewhere.  Stride 1, padding ``K // 2``.
    """
    kernel, (rows, cols) = _diagonal(channels, groups, size, dtype, device)
    kernel[rows, cols, size[0] // 2, size[1] // 2] = 1
    return kernel


def avg_pool_kernel(
    channels: int,
    groups: int = 1,
    size: Sequence[int] = (3, 3),
    *,
    dtype: torch.dtype | None = None,
    device: Any = None,
) -> torch.Tensor:
    """The ``(C, C/groups, KH, KW)`` kernel of a KH×KW average pooling (per channel):
    ``1 / (KH·KW)`` over the whole window where output channel = input channel (per group).

    Equals ``F.avg_pool2d`` with the same stride and padding and ``count_include_pad=True``.
    """
    kernel, (rows, cols) = _diagonal(channels, groups, size, dtype, device)
    kernel[rows, cols] = 1.0 / (size[0] * size[1])
    return kernel


def merge_sequential(
    first: torch.Tensor,
    first_bias: torch.Tensor | None,
    second: torch.Tensor,
    second_bias: torch.Tensor | None,
    groups: int = 1,
) -> KernelBias:
    """A 1×1 conv ``(W1: D × C/g, b1)`` followed by a K×K conv ``(W2: E × D/g, b2)``, both with
    ``groups = g``, as one K×K conv ``(W: E × C/g, b)``:

    ``W[e, c] = Σ_d W2[e, d] · W1[d, c]`` (d over e's group) and
    ``b[e] = b2[e] + Σ_{d, h, w} W2[e, d, h, w] · b1[d]``.

    Exact when the map between the two convs is padded with the 1×1's response to a zero input
    (``b1``), i.e. as if the padding had been applied before the 1×1 (DBB's "BN and pad").
    """
    d_channels, c_per_group = first.shape[:2]
    e_channels, d_per_group, kh, kw = second.shape
    if first.shape[2:] != (1, 1):
        raise ValueError(
            f"merge_sequential: the first kernel must be 1×1, got {tuple(first.shape)}"
        )
    if d_channels != d_per_group * groups or e_channels % groups:
        raise ValueError(
            f"merge_sequential: kernels {tuple(first.shape)} and {tuple(second.shape)} do not "
            f"chain with groups={groups}"
        )
    w1 = first.reshape(groups, d_per_group, c_per_group)
    w2 = second.reshape(groups, e_channels // groups, d_per_group, kh, kw)
    kernel = torch.einsum("gedhw,gdc->gechw", w2, w1).reshape(e_channels, c_per_group, kh, kw)
    b1 = _bias_or_zeros(first, first_bias).reshape(groups, d_per_group)
    bias = torch.einsum("gedhw,gd->ge", w2, b1).reshape(e_channels)
    return kernel, bias + _bias_or_zeros(second, second_bias)


def add_branches(branches: Sequence[KernelBias]) -> KernelBias:
    """Parallel convs with equal shapes, strides and aligned centres, outputs summed:
    the sum of their kernels and the sum of their biases."""
    if not branches:
        raise ValueError("add_branches: no branches")
    kernel = torch.stack([k for k, _ in branches]).sum(0)
    bias = torch.stack([b for _, b in branches]).sum(0)
    return kernel, bias
