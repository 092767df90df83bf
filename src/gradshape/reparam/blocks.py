"""Training-time multi-branch blocks that fold back into one K×K convolution.

* :class:`ACBlock` (ACNet, Ding et al., ICCV 2019): K×K + 1×K + K×1.
* :class:`RepVGGBlock` (RepVGG, Ding et al., CVPR 2021): K×K + 1×1 + identity.
* :class:`DiverseBranchBlock` (DBB, Ding et al., CVPR 2021): K×K + 1×1 + (1×1 → K×K) +
  (1×1 → K×K average pooling).

Each block stands in for one ``nn.Conv2d(in_channels, out_channels, K, stride, padding,
groups=groups, padding_mode=...)`` and takes one of two BatchNorm placements (``bn``):

``"per_branch"``
    every branch ends in its own BatchNorm2d and the branch outputs are summed: the form the
    papers train.  The block replaces the conv *and* the BatchNorm that followed it.
``"after_sum"``
    the branches are plain convs (the main one keeps the conv's bias), summed; a BatchNorm that
    followed the conv stays where it is, after the sum.  With masked-conv branches this is the
    form in which Lemma 1 of the SGS paper (Detkov et al., ICLR 2023) is exact.

Every branch is aligned to the K×K conv's centre: a kh×kw branch uses padding
``p − (K − k)/2`` per dimension, and where that is negative it crops the input instead (as
ACNet does), so any padding ``p >= 0`` and any ``padding_mode`` fuse exactly.

:meth:`ReparamBlock.get_equivalent_kernel_bias` gives the single conv the block equals in eval
mode (differentiable); :meth:`ReparamBlock.fused` builds it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ..selection import forward_override
from .fusion import (
    KernelBias,
    add_branches,
    avg_pool_kernel,
    batchnorm_affine,
    fold_batchnorm,
    identity_kernel,
    merge_sequential,
    pad_to_kernel,
)

__all__ = [
    "BN_MODES",
    "INITS",
    "ACBlock",
    "ConvBranch",
    "DiverseBranchBlock",
    "PadAfterPointwise",
    "PointwiseBranch",
    "RepVGGBlock",
    "ReparamBlock",
    "conv_from_kernel",
    "conversion_obstacle",
]

#: Where the BatchNorms sit: one per branch (the papers' form) or one after the sum (Lemma 1).
BN_MODES = ("per_branch", "after_sum")
#: How :meth:`ReparamBlock.from_conv` initialises a block: function-preserving or fresh.
INITS = ("preserve", "fresh")

Pair = tuple[int, int]


def _pair(value: int | Sequence[int], label: str, where: str) -> Pair:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (
        not isinstance(value, Sequence)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise TypeError(f"{where}: {label} must be an int or a pair of ints, got {value!r}")
    return (value[0], value[1])


def _bias(conv: nn.Conv2d) -> torch.Tensor:
    if conv.bias is None:
        return conv.weight.new_zeros(conv.out_channels)
    return conv.bias


def _fold(kernel: torch.Tensor, bias: torch.Tensor, bn: nn.Module | None) -> KernelBias:
    return (kernel, bias) if bn is None else fold_batchnorm(kernel, bias, bn)


def conv_from_kernel(like: nn.Module, kernel: torch.Tensor, bias: torch.Tensor | None) -> nn.Conv2d:
    """A new plain ``nn.Conv2d`` holding ``kernel`` and ``bias`` (``None``: no bias), on
    ``kernel``'s device and dtype, with the geometry of ``like`` (a conv or a block standing in
    for one: its ``in_channels``, ``out_channels``, ``kernel_size``, ``stride``, ``padding``,
    ``dilation``, ``groups`` and ``padding_mode``).

    The conv is built with PyTorch's default initialisation (drawn from the global RNG) and
    then overwritten.
    """
    conv = nn.Conv2d(
        like.in_channels,
        like.out_channels,
        like.kernel_size,
        like.stride,
        like.padding,
        like.dilation,
        like.groups,
        bias=bias is not None,
        padding_mode=like.padding_mode,
        device=kernel.device,
        dtype=kernel.dtype,
    )
    with torch.no_grad():
        conv.weight.copy_(kernel)
        if bias is not None:
            conv.bias.copy_(bias)
    return conv


def conversion_obstacle(conv: nn.Module) -> str:
    """Why ``conv`` cannot become a block (an empty string when it can).

    A ``Conv2d`` subclass converts when it computes torch's own convolution of its weight
    (it overrides neither ``forward`` nor ``_conv_forward``, e.g. one that only adds a
    constructor); one that overrides them is refused with the reason of
    :func:`gradshape.selection.forward_override`, the rule SGS applies too.
    """
    kind = type(conv).__name__
    if not isinstance(conv, nn.modules.conv._ConvNd):
        return f"{kind} is not a convolution"
    if conv.transposed:
        return f"{kind} is a transposed convolution: its branches would not fold into one kernel"
    if not isinstance(conv, nn.Conv2d):
        return f"{kind} is not 2-D: the blocks are defined for Conv2d only"
    if isinstance(conv.weight, nn.parameter.UninitializedParameter):
        return f"{kind} is lazy and not materialised yet: run one forward pass first"
    override = forward_override(conv)
    if override:
        return override
    if not conv.weight.requires_grad:
        return (
            f"{kind}'s weight is frozen (requires_grad=False): a block in its place would train "
            "new branches; unfreeze it first to convert it"
        )
    if any(k % 2 == 0 for k in conv.kernel_size):
        return f"kernel {tuple(conv.kernel_size)} has an even size: no centre to align branches on"
    if all(k == 1 for k in conv.kernel_size):
        return "kernel (1, 1): no smaller branch to add"
    if any(d != 1 for d in conv.dilation):
        return f"dilation {tuple(conv.dilation)}: the blocks' branches assume dilation 1"
    if parametrize.is_parametrized(conv, "weight") or not isinstance(conv.weight, nn.Parameter):
        return "its weight is parametrized or recomputed (weight_norm, spectral_norm, ...)"
    return ""


def _padding(conv: nn.Conv2d) -> Pair:
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":  # odd kernel, dilation 1
        return (conv.kernel_size[0] // 2, conv.kernel_size[1] // 2)
    return _pair(tuple(conv.padding), "padding", type(conv).__name__)


class ConvBranch(nn.Module):
    """One parallel branch: (crop) → kh×kw conv → (BatchNorm), aligned to a K×K conv's centre.

    For the K×K conv's padding ``p`` the branch pads ``q = p − (K − k)/2`` per dimension, and
    crops ``−q`` pixels from each side where ``q < 0``; output pixel (i, j) then sees the same
    input pixels as the centre part of the K×K kernel at (i, j).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Pair,
        *,
        full_kernel: Pair,
        stride: Pair,
        padding: Pair,
        groups: int,
        bias: bool,
        padding_mode: str,
        norm: nn.BatchNorm2d | None,
    ) -> None:
        super().__init__()
        offsets = [
            p - (big - k) // 2 for p, big, k in zip(padding, full_kernel, kernel_size, strict=True)
        ]
        self.full_kernel = full_kernel
        self.crop = (max(-offsets[0], 0), max(-offsets[1], 0))
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            (max(offsets[0], 0), max(offsets[1], 0)),
            groups=groups,
            bias=bias,
            padding_mode=padding_mode,
        )
        self.register_module("bn", norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ch, cw = self.crop
        if ch or cw:
            x = x[..., ch : x.shape[-2] - ch, cw : x.shape[-1] - cw]
        y = self.conv(x)
        return y if self.bn is None else self.bn(y)

    def kernel_bias(self) -> KernelBias:
        """The branch as a K×K ``(kernel, bias)`` in eval mode."""
        kernel, bias = _fold(self.conv.weight, _bias(self.conv), self.bn)
        return pad_to_kernel(kernel, self.full_kernel), bias

    def mask(self) -> torch.Tensor:
        """The branch's binary receptive-field mask inside the K×K kernel (float64)."""
        ones = torch.ones(self.conv.kernel_size, dtype=torch.float64)
        return pad_to_kernel(ones, self.full_kernel)

    def silence(self) -> None:
        """Make the branch output zero: zero its BatchNorm's affine weights, or without a
        BatchNorm its conv; the weights in front of a zero γ still learn once γ moves."""
        with torch.no_grad():
            last = self.conv if self.bn is None else self.bn
            last.weight.zero_()
            if last.bias is not None:
                last.bias.zero_()


class PadAfterPointwise(nn.Module):
    """(BatchNorm →) padding, as if the padding had been applied before the preceding 1×1.

    Zero padding after a 1×1 stage with an affine part ``y = s·x + t`` breaks the fusion at the
    border (the fused conv sees ``t`` there, not 0): DBB's "BN and pad" layer pads with ``t``,
    the BatchNorm's eval output for a zero input (``shift`` of
    :func:`~gradshape.reparam.fusion.batchnorm_affine`).  Other padding modes (reflect,
    replicate, circular) commute with a per-pixel map and are applied as they are.

    .. warning::
        As in DBB, the padding value comes from the running statistics even in training mode,
        where the interior is normalised with the batch's: exact in eval mode only.
    """

    def __init__(self, padding: Pair, padding_mode: str, norm: nn.BatchNorm2d | None) -> None:
        super().__init__()
        self.padding = padding
        self.padding_mode = padding_mode
        self.register_module("bn", norm)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if self.bn is not None:
            y = self.bn(y)
        ph, pw = self.padding
        if not (ph or pw):
            return y
        pads = (pw, pw, ph, ph)
        if self.padding_mode != "zeros":
            return F.pad(y, pads, mode=self.padding_mode)
        if self.bn is None:
            return F.pad(y, pads)
        value = batchnorm_affine(self.bn)[1].reshape(1, -1, 1, 1)
        return F.pad(y - value, pads) + value


class PointwiseBranch(nn.Module):
    """A DBB branch: 1×1 conv → (BatchNorm) → pad → K×K conv or K×K average pooling →
    (BatchNorm).  The spatial stage carries the stride and pads nothing itself."""

    def __init__(
        self,
        in_channels: int,
        mid_channels: int,
        out_channels: int,
        *,
        kernel_size: Pair,
        stride: Pair,
        padding: Pair,
        groups: int,
        padding_mode: str,
        pooling: bool,
        norms: tuple[nn.BatchNorm2d | None, nn.BatchNorm2d | None],
    ) -> None:
        super().__init__()
        self.groups = groups
        self.pointwise = nn.Conv2d(in_channels, mid_channels, 1, groups=groups, bias=False)
        self.pad = PadAfterPointwise(padding, padding_mode, norms[0])
        if pooling:
            if mid_channels != out_channels:
                raise ValueError("PointwiseBranch: pooling keeps the channel count")
            self.spatial: nn.Module = nn.AvgPool2d(kernel_size, stride, padding=0)
        else:
            self.spatial = nn.Conv2d(
                mid_channels, out_channels, kernel_size, stride, 0, groups=groups, bias=False
            )
        self.register_module("bn", norms[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.spatial(self.pad(self.pointwise(x)))
        return y if self.bn is None else self.bn(y)

    def kernel_bias(self) -> KernelBias:
        """The branch as one K×K ``(kernel, bias)`` in eval mode (:func:`merge_sequential`)."""
        first = _fold(self.pointwise.weight, _bias(self.pointwise), self.pad.bn)
        if isinstance(self.spatial, nn.AvgPool2d):
            # built in the weight's dtype: 1/K² rounded once (a float32 buffer cast to float64
            # would carry float32 round-off)
            weight = self.pointwise.weight
            second_kernel = avg_pool_kernel(
                weight.shape[0],
                self.groups,
                self.spatial.kernel_size,
                dtype=weight.dtype,
                device=weight.device,
            )
        else:
            second_kernel = self.spatial.weight
        second = _fold(second_kernel, second_kernel.new_zeros(second_kernel.shape[0]), self.bn)
        return merge_sequential(*first, *second, groups=self.groups)

    def silence(self) -> None:
        """Make the branch output zero (its last BatchNorm's affine weights, or without one its
        last weights: the K×K conv, or the 1×1 in front of the pooling)."""
        with torch.no_grad():
            if self.bn is not None:
                self.bn.weight.zero_()
                self.bn.bias.zero_()
            elif isinstance(self.spatial, nn.Conv2d):
                self.spatial.weight.zero_()
            else:
                self.pointwise.weight.zero_()


class ReparamBlock(nn.Module):
    """Base class: the conv's hyperparameters, the main K×K branch ``dense``, fusion.

    Args:
        in_channels, out_channels, kernel_size, stride, groups, padding_mode: as for the
            ``nn.Conv2d`` the block stands in for.  Kernel sizes must be odd (the branches
            align on the centre); dilation is 1.
        padding: ``p >= 0`` per dimension; ``None`` means ``K // 2`` ("same" at stride 1).
        bias: whether the main branch has a bias (the others never do).
        bn: ``"per_branch"`` or ``"after_sum"`` (see the module docstring).
        eps, momentum: for the BatchNorms the block creates.

    A freshly constructed block has PyTorch's default initialisation in every branch (BatchNorm
    γ = 1, β = 0), as the papers train it.  :meth:`from_conv` builds one that starts out equal to
    a given conv.

    Code that inspects the conv a block replaced (e.g. a layer that pads its input from
    ``self.conv.kernel_size``, ``stride`` and ``dilation``) finds what it would on that conv:
    ``in_channels``, ``out_channels``, ``groups``, ``padding_mode`` and the pairs
    ``kernel_size``, ``stride``, ``padding`` (a conv's ``"same"``/``"valid"`` become the pair
    they mean) and ``dilation = (1, 1)``, plus the read-only :attr:`weight` and :attr:`bias` of
    the equivalent conv.  The attribute ``bn`` is the BatchNorm placement, not a module.
    """

    kind: ClassVar[str]

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int] = 3,
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] | None = None,
        groups: int = 1,
        bias: bool = False,
        padding_mode: str = "zeros",
        bn: str = "per_branch",
        eps: float = 1e-5,
        momentum: float | None = 0.1,
    ) -> None:
        super().__init__()
        where = type(self).__name__
        kernel = _pair(kernel_size, "kernel_size", where)
        if any(k < 1 or k % 2 == 0 for k in kernel):
            raise ValueError(
                f"{where}: kernel_size must be odd (a centre to align on), got {kernel}"
            )
        stride = _pair(stride, "stride", where)
        padding = (kernel[0] // 2, kernel[1] // 2) if padding is None else padding
        padding = _pair(padding, "padding", where)
        if any(s < 1 for s in stride) or any(p < 0 for p in padding):
            raise ValueError(f"{where}: stride must be >= 1 and padding >= 0")
        for label, v in (("in_channels", in_channels), ("out_channels", out_channels)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{where}: {label} must be a positive int, got {v!r}")
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ValueError(f"{where}: groups must be a positive int, got {groups!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"{where}: in_channels ({in_channels}) and out_channels ({out_channels}) must be "
                f"divisible by groups ({groups})"
            )
        if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise ValueError(f"{where}: unknown padding_mode {padding_mode!r}")
        if bn not in BN_MODES:
            raise ValueError(f"{where}: bn must be one of {BN_MODES}, got {bn!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel, stride, padding
        self.dilation: Pair = (1, 1)
        self.groups, self.padding_mode, self.bn = groups, padding_mode, bn
        self.eps, self.momentum = eps, momentum
        self.dense = self._branch(kernel, bias=bias)

    # ---- building ------------------------------------------------------------------------
    def _norm(self, channels: int | None = None) -> nn.BatchNorm2d | None:
        if self.bn != "per_branch":
            return None
        return nn.BatchNorm2d(channels or self.out_channels, self.eps, self.momentum)

    def _branch(self, kernel_size: Pair, *, bias: bool = False) -> ConvBranch:
        return ConvBranch(
            self.in_channels,
            self.out_channels,
            kernel_size,
            full_kernel=self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            groups=self.groups,
            bias=bias,
            padding_mode=self.padding_mode,
            norm=self._norm(),
        )

    def _pointwise_branch(self, mid_channels: int, *, pooling: bool) -> PointwiseBranch:
        """1×1 (``in → mid``) → K×K conv or average pooling, with the block's geometry."""
        return PointwiseBranch(
            self.in_channels,
            mid_channels,
            self.out_channels,
            kernel_size=self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            groups=self.groups,
            padding_mode=self.padding_mode,
            pooling=pooling,
            norms=(self._norm(mid_channels), self._norm()),
        )

    def _silence_side_branches(self) -> None:
        """Make every branch but ``dense`` output zero."""
        for branch in self.children():
            if branch is not self.dense and isinstance(branch, (ConvBranch, PointwiseBranch)):
                branch.silence()

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        bn: nn.BatchNorm2d | None = None,
        *,
        mode: str = "per_branch",
        init: str = "preserve",
    ) -> ReparamBlock:
        """The block standing in for ``conv`` (and, with ``mode="per_branch"``, the BatchNorm
        ``bn`` after it), on the conv's device and dtype.

        ``init="preserve"``: the block computes what ``conv`` (then ``bn``) computed, in train
        and eval mode.  The main branch gets the conv's weight and bias (and, per branch, ``bn``
        itself); the other branches are silenced: their last BatchNorm gets γ = β = 0 (per
        branch), or their last weights are zero (after the sum); RepVGG's identity, which has
        no weights, is subtracted from the main kernel after the sum.  The silenced branches
        still learn (Lemma 1 holds for any split of the initial kernel).
        ``init="fresh"``: PyTorch's default initialisation, nothing copied (as the papers train).
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"{cls.__name__}.from_conv: conv must be an nn.Conv2d")
        obstacle = conversion_obstacle(conv)
        if obstacle:
            raise ValueError(f"{cls.__name__}.from_conv: {obstacle}")
        if init not in INITS:
            raise ValueError(f"{cls.__name__}.from_conv: init must be one of {INITS}, got {init!r}")
        if mode == "per_branch" and not isinstance(bn, nn.BatchNorm2d):
            raise ValueError(
                f"{cls.__name__}.from_conv: mode='per_branch' needs the BatchNorm2d that follows "
                "the conv (bn=...); use mode='after_sum' for a conv without one"
            )
        if mode == "after_sum" and bn is not None:
            raise ValueError(
                f"{cls.__name__}.from_conv: with mode='after_sum' the BatchNorm stays after the "
                "block; pass bn only with mode='per_branch'"
            )
        if bn is not None:
            if bn.num_features != conv.out_channels:
                raise ValueError(
                    f"{cls.__name__}.from_conv: bn has {bn.num_features} features, the conv "
                    f"{conv.out_channels} output channels"
                )
            if bn.running_mean is None:
                raise ValueError(
                    f"{cls.__name__}.from_conv: bn has track_running_stats=False; its eval "
                    "output depends on the batch and cannot be fused"
                )
        eps, momentum = (bn.eps, bn.momentum) if bn is not None else (1e-5, 0.1)
        block = cls(
            conv.in_channels,
            conv.out_channels,
            tuple(conv.kernel_size),
            tuple(conv.stride),
            _padding(conv),
            conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            bn=mode,
            eps=eps,
            momentum=momentum,
        ).to(device=conv.weight.device, dtype=conv.weight.dtype)
        if init == "preserve":
            with torch.no_grad():
                block.dense.conv.weight.copy_(conv.weight)
                if conv.bias is not None:
                    block.dense.conv.bias.copy_(conv.bias)
            if mode == "per_branch":
                block.dense.bn = bn
            block._silence_side_branches()
        return block

    # ---- fusion --------------------------------------------------------------------------
    def get_equivalent_kernel_bias(self) -> KernelBias:
        """The ``(kernel, bias)`` of the one conv this block equals in eval mode, shapes
        ``(out, in/groups, KH, KW)`` and ``(out,)``; differentiable in the block's parameters."""
        return add_branches([b.kernel_bias() for b in self._fusable_branches()])

    @property
    def weight(self) -> torch.Tensor:
        """The kernel ``(out, in/groups, KH, KW)`` of the one conv this block equals in eval mode:
        :meth:`get_equivalent_kernel_bias`'s, detached, on the block's device and dtype (the
        weight :func:`~gradshape.reparam.fuse` deploys).  With ``bn="per_branch"`` the block
        has absorbed the BatchNorm that followed the conv, so this is the conv with that
        BatchNorm folded in (running statistics), not the conv alone.

        Read-only and recomputed on each access: it is not a Parameter (train the branches'),
        not in ``state_dict()`` and carries no gradient.
        """
        return self._equivalent()[0]

    @property
    def bias(self) -> torch.Tensor:
        """The bias ``(out,)`` of the equivalent conv (see :attr:`weight`); a tensor (zeros
        where nothing adds one) even when the replaced conv had no bias, as :meth:`fused`
        builds its conv with a bias."""
        return self._equivalent()[1]

    def _equivalent(self) -> KernelBias:
        with torch.no_grad():
            kernel, bias = self.get_equivalent_kernel_bias()
        return kernel.detach(), bias.detach()

    def _fusable_branches(self) -> list[nn.Module]:
        return [m for m in self.children() if isinstance(m, (ConvBranch, PointwiseBranch))]

    def branch_masks(self) -> list[torch.Tensor]:
        """The binary K×K masks of the branches that are masked convs of their own weight
        (Lemma 1's ``M_n``); sequential, pooling and identity branches are not and are left
        out.  ``sum(masks)`` is the Lemma 1 scaling of the masked part."""
        return [m.mask() for m in self.children() if isinstance(m, ConvBranch)]

    def fused(self) -> nn.Conv2d:
        """A new plain ``nn.Conv2d`` (with bias) equal to this block in eval mode."""
        return conv_from_kernel(self, *self.get_equivalent_kernel_bias())

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, groups={self.groups}, bn={self.bn!r}"
        )


class ACBlock(ReparamBlock):
    """Asymmetric Convolution Block (Ding et al., "ACNet", ICCV 2019): K×K + 1×K + K×1.

    ``y = dense(x) + hor(x) + ver(x)``; the 1×K branch covers the kernel's centre row and the
    K×1 branch its centre column, so Lemma 1's scaling is full + row + column
    (``gs.branch_scaling("acb", K)``; for 3×3 ``[[1, 2, 1], [2, 3, 2], [1, 2, 1]]``).
    """

    kind = "acb"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        kh, kw = self.kernel_size
        self.hor = self._branch((1, kw))
        self.ver = self._branch((kh, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(x) + self.hor(x) + self.ver(x)


class RepVGGBlock(ReparamBlock):
    """RepVGG block (Ding et al., "RepVGG", CVPR 2021): K×K + 1×1 + identity.

    ``y = dense(x) + pointwise(x) + id(x)`` with ``id`` = BatchNorm (per branch) or the identity
    (after the sum); the identity branch exists only where it aligns: ``in_channels ==
    out_channels``, stride 1 and padding ``K // 2``.  Lemma 1's scaling of the weighted branches
    is full + centre (``gs.branch_scaling("repvgg", K)``).

    .. warning::
        After the sum, the identity is a constant inside the merged kernel
        ``W = W_dense + W_1x1 + I``: weight decay shrinks ``W − I``, not ``W``, so Lemma 1 then
        holds without weight decay only.
    """

    kind = "repvgg"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pointwise = self._branch((1, 1))
        kh, kw = self.kernel_size
        self.has_identity = (
            self.in_channels == self.out_channels
            and self.stride == (1, 1)
            and self.padding == (kh // 2, kw // 2)
        )
        self.identity: nn.Module | None = None
        if self.has_identity:
            norm = self._norm(self.in_channels)
            self.identity = nn.Identity() if norm is None else norm
            # Not persistent: derived from the shape, and follows .to(device, dtype).
            self.register_buffer(
                "identity_kernel",
                identity_kernel(self.out_channels, self.groups, self.kernel_size),
                persistent=False,
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dense(x) + self.pointwise(x)
        return y if self.identity is None else y + self.identity(x)

    def get_equivalent_kernel_bias(self) -> KernelBias:
        branches = [self.dense.kernel_bias(), self.pointwise.kernel_bias()]
        if self.identity is not None:
            kernel = self.identity_kernel
            bias = kernel.new_zeros(self.out_channels)
            bn = self.identity if isinstance(self.identity, nn.BatchNorm2d) else None
            branches.append(_fold(kernel, bias, bn))
        return add_branches(branches)

    def _silence_side_branches(self) -> None:
        super()._silence_side_branches()
        if isinstance(self.identity, nn.BatchNorm2d):
            with torch.no_grad():
                self.identity.weight.zero_()
                self.identity.bias.zero_()
        elif self.identity is not None:
            with torch.no_grad():
                self.dense.conv.weight.sub_(self.identity_kernel)


class DiverseBranchBlock(ReparamBlock):
    """Diverse Branch Block (Ding et al., "Diverse Branch Block", CVPR 2021).

    ``y = dense(x) + pointwise(x) + seq(x) + avg(x)``:

    * ``dense``: K×K; ``pointwise``: 1×1;
    * ``seq``: 1×1 (``in → D``) → (BN) → pad → K×K (``D → out``), with ``D = in_channels``, or
      ``2·in_channels`` when ``groups == out_channels`` (DBB's choice for depthwise convs);
      its 1×1 starts as the identity when ``D == in_channels``;
    * ``avg``: 1×1 (``in → out``) → (BN) → pad → K×K average pooling → (BN).

    The padding between the 1×1 and the spatial stage is :class:`PadAfterPointwise` (DBB's
    "BN and pad"), which keeps the fusion exact at the border.  The sequential and pooling
    branches are not masked convs: Lemma 1 does not apply, and ``gs.branch_scaling("dbb")``
    is an approximation.

    .. warning::
        Deviations from DBB's code: the 1×1 and average-pooling branches exist for depthwise
        convs too (DBB drops the 1×1 and the pooling branch's 1×1 there); the identity-started
        1×1 of ``seq`` is a plain weight (DBB adds a fixed identity to a zero-started one, so
        that weight decay pulls it towards the identity rather than zero).
    """

    kind = "dbb"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pointwise = self._branch((1, 1))
        inner = self.in_channels if self.groups < self.out_channels else 2 * self.in_channels
        self.seq = self._pointwise_branch(inner, pooling=False)
        if inner == self.in_channels:
            with torch.no_grad():
                self.seq.pointwise.weight.copy_(identity_kernel(inner, self.groups, (1, 1)))
        self.avg = self._pointwise_branch(self.out_channels, pooling=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(x) + self.pointwise(x) + self.seq(x) + self.avg(x)
