"""From spatial dependence to spatial gradient scalings, and the fixed scalings of the paper.

Everything here is a pure function on small tensors:

* :func:`k_transform` and :func:`dependence_to_scaling` turn per-channel dependence matrices
  S (paper Eq. 7) into one scaling G per layer (paper Eq. 8, then mean normalisation).
* :func:`masks_to_scaling` and :func:`branch_scaling` give the G of Lemma 1 for a multi-branch
  structure: G = Σ_n M_n, the sum of the branches' binary receptive-field masks.
* :func:`grid_scaling` is the two-parameter 3×3 grid of the paper's grid-search ablation.

Reference: A. Detkov et al., "Reparameterization through Spatial Gradient Scaling", ICLR 2023.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch

__all__ = [
    "BRANCH_KINDS",
    "DEFAULT_FLOOR",
    "branch_scaling",
    "dependence_to_scaling",
    "grid_scaling",
    "k_transform",
    "masks_to_scaling",
]

#: Smallest value a position of G may take before mean normalisation, relative to the centre
#: (whose dependence is 1).  A position with no measurable dependence would otherwise get a zero
#: scaling and never learn; the paper requires G > 0.
DEFAULT_FLOOR = 1e-3

#: Structures :func:`branch_scaling` knows, with whether Lemma 1 is exact for them.
BRANCH_KINDS = {
    "acb": "exact: K×K + 1×K + K×1 masked convs (one BN after the sum)",
    "repvgg": "exact for the weighted branches: K×K + 1×1 (the identity branch has no weights)",
    "dbb": "approximate: K×K + 1×1 + (1×1→K×K); the pooling branch is not a mask (left out)",
}


def k_transform(s: torch.Tensor, k: float) -> torch.Tensor:
    """Paper Eq. 8: ``g = k·s / ((k − 1)·s + 1)``, element-wise.

    Maps a dependence ``s ∈ [0, 1]`` to ``[0, 1]`` with ``0 → 0`` and ``1 → 1``; ``k > 1`` lifts
    small dependences (flatter scalings), ``k < 1`` suppresses them, ``k = 1`` is the identity.
    NaN entries stay NaN.
    """
    if not isinstance(s, torch.Tensor):
        raise TypeError(f"k_transform: s must be a tensor, got {type(s).__name__}")
    _check_k(k)
    if k == 1.0:
        return s.clone()
    return k * s / ((k - 1.0) * s + 1.0)


def _check_k(k: float) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, float)):
        raise TypeError(f"k must be a real number, got {type(k).__name__}")
    if not math.isfinite(k) or k <= 0:
        raise ValueError(f"k must be finite and > 0, got {k}")


def _check_floor(floor: float, where: str) -> None:
    if isinstance(floor, bool) or not isinstance(floor, (int, float)):
        raise TypeError(f"{where}: floor must be a real number, got {type(floor).__name__}")
    if not 0 < floor <= 1:
        raise ValueError(f"{where}: floor must lie in (0, 1], got {floor}")


def dependence_to_scaling(
    dependence: torch.Tensor,
    k: float = 5.0,
    *,
    floor: float = DEFAULT_FLOOR,
    layer: str = "layer",
    live: torch.Tensor | None = None,
) -> torch.Tensor:
    """Turn per-channel dependence matrices into one mean-1 spatial gradient scaling.

    Args:
        dependence: ``(C, *kernel)`` tensor, S per input channel; NaN marks a channel/position
            whose dependence is undefined (a constant channel) and is skipped.
        k: the transform of :func:`k_transform`.
        floor: lower bound applied after averaging, before normalisation (see
            :data:`DEFAULT_FLOOR`); must lie in (0, 1].
        layer: name used in the warning.
        live: optional bool tensor of the kernel's shape: the taps that see at least one pair
            of real pixels (see ``DependenceAccumulator.live``).  ``None``: every tap is live.

    Returns:
        ``G`` of shape ``kernel``, float64, strictly positive, mean 1 over the live taps:
        ``G = clamp(nanmean_c k_transform(S_c), floor) / mean_live(...)`` on live taps and
        ``G = 1`` on dead ones.  A live position where every channel is NaN gets the floor.
        When no off-centre tap is live, or every channel is degenerate at every live
        off-centre position, ``G`` is all ones and a :class:`RuntimeWarning` names the layer.

    .. warning::
        Dead taps are a deliberate deviation from the authors' code.  A tap whose offset
        reaches beyond the map (dilation × offset ≥ the map's size, e.g. an atrous rate-12
        branch on an 8×8 map, or a 7×7×7 kernel on a 1×1×1 bottleneck) multiplies zero padding
        only: its gradient is exactly 0, but its small dependence would still count in the
        mean, and the live taps would absorb the rest (their code gives the centre the whole
        kernel's weight, up to ~200× the plain step).  Here such a layer behaves like the 1×1
        conv it effectively is.
    """
    if not isinstance(dependence, torch.Tensor):
        raise TypeError(
            f"dependence_to_scaling: dependence must be a tensor, got {type(dependence).__name__}"
        )
    if dependence.dim() < 2 or dependence.shape[0] == 0 or dependence[0].numel() == 0:
        raise ValueError(
            "dependence_to_scaling: dependence must have shape (C, *kernel) with C >= 1, got "
            f"{tuple(dependence.shape)}"
        )
    if dependence.is_complex():
        raise TypeError("dependence_to_scaling: dependence must be real")
    _check_floor(floor, "dependence_to_scaling")
    kernel_shape = dependence.shape[1:]
    if live is None:
        live = torch.ones(kernel_shape, dtype=torch.bool)
    elif not isinstance(live, torch.Tensor) or live.shape != kernel_shape:
        raise ValueError(
            f"dependence_to_scaling: live must be a bool tensor of the kernel's shape "
            f"{tuple(kernel_shape)} for {layer!r}"
        )
    live = live.to("cpu", torch.bool)
    dependence = torch.where(live, dependence.double().cpu(), torch.nan)
    defined = dependence[~torch.isnan(dependence)]
    if not bool(((defined >= 0) & (defined <= 1)).all()):
        raise ValueError(
            f"dependence_to_scaling: the dependence of {layer!r} must lie in [0, 1] (NaN where "
            "undefined)"
        )
    s = k_transform(dependence, k)
    valid = ~torch.isnan(s)
    counts = valid.sum(0)
    off_centre = counts.clone()
    if s[0].numel() > 1:
        off_centre[tuple(n // 2 for n in kernel_shape)] = 0
    if int(off_centre.sum()) == 0:
        why = (
            "every channel of its input is degenerate (constant, or no pixel pairs)"
            if bool(live.sum() > 1) or s[0].numel() == 1
            else "no off-centre tap sees a pair of real pixels (the kernel reaches beyond the "
            "map: it acts as a 1x1 conv)"
        )
        warnings.warn(
            f"SGS: {why} in {layer!r}: its spatial gradient scaling is set to all ones",
            RuntimeWarning,
            stacklevel=3,
        )
        return torch.ones(kernel_shape, dtype=torch.float64)
    total = torch.where(valid, s, torch.zeros_like(s)).sum(0)
    mean = torch.where(counts > 0, total / counts.clamp(min=1), torch.zeros_like(total))
    mean = mean.clamp(min=floor)
    g = mean / mean[live].mean()
    return torch.where(live, g, torch.ones_like(g))


def masks_to_scaling(masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Lemma 1: the scaling equivalent to parallel masked-conv branches is ``G = Σ_n M_n``.

    Args:
        masks: one binary tensor per branch, all of the kernel's shape; 1 where the branch's
            kernel covers that position.

    Returns:
        ``G`` (float64, not mean-normalised: the equivalence needs the raw sum).

    Every position must be covered by at least one branch: an uncovered position would get a
    zero scaling and never learn.
    """
    if isinstance(masks, torch.Tensor) or not isinstance(masks, Sequence) or not masks:
        raise TypeError("masks must be a non-empty sequence of tensors (one per branch)")
    converted = []
    for i, m in enumerate(masks):
        try:
            converted.append(torch.as_tensor(m, dtype=torch.float64))
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"masks[{i}] must be a tensor of 0s and 1s ({err})") from None
    shape = converted[0].shape
    if not shape:
        raise ValueError("masks[0] is a scalar; each mask has the kernel's shape")
    total = torch.zeros(shape, dtype=torch.float64)
    for i, m in enumerate(converted):
        if m.shape != shape:
            raise ValueError(f"masks[{i}] has shape {tuple(m.shape)}, expected {tuple(shape)}")
        if not bool(((m == 0) | (m == 1)).all()):
            raise ValueError(f"masks[{i}] is not binary (entries must be 0 or 1)")
        total += m
    if bool((total == 0).any()):
        uncovered = [tuple(i.tolist()) for i in (total == 0).nonzero()]
        raise ValueError(
            f"kernel positions {uncovered} are covered by no branch: their scaling would be 0"
        )
    return total


def _kernel_2d(kernel_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(kernel_size, int) and not isinstance(kernel_size, bool):
        kernel_size = (kernel_size, kernel_size)
    if not isinstance(kernel_size, Sequence) or not all(
        isinstance(s, int) and not isinstance(s, bool) for s in kernel_size
    ):
        raise TypeError(f"kernel_size must be an int or a pair of ints, got {kernel_size!r}")
    kernel_size = tuple(kernel_size)
    if len(kernel_size) != 2 or any(s < 1 or s % 2 == 0 for s in kernel_size):
        raise ValueError(
            f"kernel_size must be an odd int or a pair of odd ints (a branch structure needs a "
            f"centre), got {kernel_size}"
        )
    return kernel_size


def branch_scaling(kind: str, kernel_size: int | Sequence[int] = 3) -> torch.Tensor:
    """The Lemma 1 scaling of a named multi-branch structure (float64, not normalised).

    * ``"acb"`` (ACNet): K×K + 1×K + K×1 → full + centre row + centre column;
      for 3×3: ``[[1, 2, 1], [2, 3, 2], [1, 2, 1]]``.
    * ``"repvgg"``: K×K + 1×1 (the identity branch has no weights) → full + centre.
    * ``"dbb"``: K×K + 1×1 + (1×1→K×K) → full + centre + full.  This is the first SGD step
      of DBB with one BN after the sum, from its function-preserving start (sequential 1×1 =
      identity, pooling 1×1 = 0), less the pooling branch's term ``mean_hw(g)/K²``, which is
      a low-pass correction no elementwise G can express (``tests/test_reparam.py``).

    .. warning::
        Lemma 1 is exact only for masked convolutions of one weight each, summed, with one
        BatchNorm after the sum and an optimizer linear in the gradients.  Per-branch BN (how
        ACNet and RepVGG train), DBB's sequential and pooling branches, and adaptive optimizers
        make the scaling an approximation of the structure's dynamics.
    """
    if not isinstance(kind, str):
        raise TypeError(f"branch_scaling: kind must be a string, got {type(kind).__name__}")
    if kind not in BRANCH_KINDS:
        raise ValueError(
            f"unknown branch structure {kind!r}; expected one of {sorted(BRANCH_KINDS)}"
        )
    kh, kw = _kernel_2d(kernel_size)
    full = torch.ones(kh, kw, dtype=torch.float64)
    centre = torch.zeros_like(full)
    centre[kh // 2, kw // 2] = 1
    if kind == "acb":
        row = torch.zeros_like(full)
        row[kh // 2, :] = 1
        col = torch.zeros_like(full)
        col[:, kw // 2] = 1
        return masks_to_scaling([full, row, col])
    if kind == "repvgg":
        return masks_to_scaling([full, centre])
    return masks_to_scaling([full, centre, full])


def grid_scaling(alpha: float, beta: float) -> torch.Tensor:
    """The paper's parametric 3×3 scaling (grid-search ablation), normalised to mean 1.

    ``G ∝ [[1/β, 1/α, 1/β], [1/α, 1, 1/α], [1/β, 1/α, 1/β]]``: ``alpha`` is the ratio of the
    centre to the edge scalings, ``beta`` the ratio of the centre to the corner scalings.
    """
    for label, v in (("alpha", alpha), ("beta", beta)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{label} must be a real number, got {type(v).__name__}")
        if not math.isfinite(v) or v <= 0:
            raise ValueError(f"{label} must be finite and > 0, got {v}")
    a, b = 1.0 / alpha, 1.0 / beta
    g = torch.tensor([[b, a, b], [a, 1.0, a], [b, a, b]], dtype=torch.float64)
    return g / g.mean()
