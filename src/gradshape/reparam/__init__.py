"""Structural reparameterization baselines: ACB, RepVGG and DBB blocks, and their fusion.

The multi-branch structures that Spatial Gradient Scaling emulates (Detkov et al., ICLR 2023,
Sec. 2.2 and 3.2), trained as structures:

    conversion = gs.reparam.convert(model, "acb")          # or "repvgg", "dbb"
    net = conversion.model                                  # train this
    deploy = gs.reparam.fuse(net)                           # one plain conv per block
    gs.reparam.max_output_difference(net, deploy, x)        # ~1e-6 in float32

Modules: :mod:`.fusion` (pure kernel/bias maps), :mod:`.blocks` (the blocks),
:mod:`.convert` (model-level conversion and fusion).

How closely SGS stands in for each structure (``tests/test_reparam.py``, float64):

* ACB with ``bn="after_sum"`` (masked convs summed, one BatchNorm after the sum): plain
  training with ``G = gs.branch_scaling("acb", K)`` follows the structure's merged weights to
  round-off (≤ 1e-10 relative after 32 steps of SGD with Nesterov momentum and weight decay,
  K = 3 and 5): Lemma 1, exact.
* RepVGG after the sum: exact without weight decay only; the identity is a constant inside
  the merged kernel, and weight decay shrinks ``W − I`` rather than ``W``.
* DBB after the sum: from the function-preserving start, the first SGD step moves the merged
  kernel by ``−lr·[(2·full + centre) ⊙ g + mean_hw(g)/K²]``: the sequential 1×1→K×K branch
  acts like one more full mask (while its 1×1 is the identity), the pooling branch adds only a
  low-pass term of weight 1/K².  ``gs.branch_scaling("dbb")`` is ``2·full + centre``, that
  step without the low-pass term.
* Per-branch BatchNorm (the papers' form) is not Lemma 1's: to first order, branch n's share
  of the merged update is weighted by ``(γ_n/σ_n)²`` of its own BatchNorm (σ_n its output's
  batch standard deviation), a data-dependent effective scaling.  With ``init="preserve"``
  the side branches start silent (γ = 0).  Relative distance of the deployed (BN-folded)
  kernels after 50 steps (3-conv net, K = 3, SGD lr 0.05, Nesterov momentum 0.9, weight decay
  1e-3, batch 16):

  ============  ==========  ==============  ================  ==============
  structure     bn          vs SGS          vs plain          SGS vs plain
  ============  ==========  ==============  ================  ==============
  ACB           after_sum   8e-16           0.45              0.45
  ACB           per_branch  0.45            0.33              0.45
  RepVGG        per_branch  0.31            0.22              0.30
  DBB           per_branch  0.59            0.28              0.56
  ============  ==========  ==============  ================  ==============

  i.e. over this horizon the per-branch structures stay closer to plain training than to
  SGS's Lemma 1 scaling: treat ``gs.branch_scaling`` as the after-the-sum structure's
  equivalent, not the per-branch one's.
"""

from .blocks import (
    BN_MODES,
    INITS,
    ACBlock,
    ConvBranch,
    DiverseBranchBlock,
    PadAfterPointwise,
    PointwiseBranch,
    ReparamBlock,
    RepVGGBlock,
    conversion_obstacle,
)
from .convert import KINDS, Conversion, convert, following_batchnorms, fuse, max_output_difference
from .dyrep import (
    DYREP_BRANCHES,
    DYREP_METRICS,
    AdjustReport,
    DyRep,
    DyRepBlock,
    branches_to_cut,
    fuse_dyrep,
    growable_branches,
    recalibrate_batchnorm,
)
from .repopt import (
    REPOPT_OPTIMIZERS,
    CSLABlock,
    DecoupledStepScaling,
    attach_repopt,
    convert_csla,
    csla_scales,
    fuse_csla,
    load_csla_scales,
    repopt_reinit,
    repopt_scalings,
)

__all__ = [
    "BN_MODES",
    "DYREP_BRANCHES",
    "DYREP_METRICS",
    "INITS",
    "KINDS",
    "REPOPT_OPTIMIZERS",
    "ACBlock",
    "AdjustReport",
    "CSLABlock",
    "ConvBranch",
    "Conversion",
    "DecoupledStepScaling",
    "DiverseBranchBlock",
    "DyRep",
    "DyRepBlock",
    "PadAfterPointwise",
    "PointwiseBranch",
    "RepVGGBlock",
    "ReparamBlock",
    "attach_repopt",
    "branches_to_cut",
    "conversion_obstacle",
    "convert",
    "convert_csla",
    "csla_scales",
    "following_batchnorms",
    "fuse",
    "fuse_csla",
    "fuse_dyrep",
    "growable_branches",
    "load_csla_scales",
    "max_output_difference",
    "recalibrate_batchnorm",
    "repopt_reinit",
    "repopt_scalings",
]
