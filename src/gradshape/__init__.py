"""gradshape: reshape convolutional gradients in the backward pass.

Spatial Gradient Scaling (Detkov et al., ICLR 2023), Channel-Directed Gradients (Lao et al.),
the PowerGrad Transform (Das et al.), and the structural
reparameterizations they stand in for (:mod:`gradshape.reparam`).

    import gradshape as gs
    sgs = gs.SpatialGradientScaling(model)      # G = 1 until the first refresh
    sgs.maybe_refresh(epoch, train_loader)      # each epoch: paper's schedule

Framework adapters live in :mod:`gradshape.integrations` (imported on demand).
"""

from . import reparam
from .channel import ChannelDirectedGradients, channel_directed
from .dependence import MEASURES, spatial_dependence
from .powergrad import PowerGrad, powergrad_cross_entropy
from .scaling import (
    BRANCH_KINDS,
    branch_scaling,
    dependence_to_scaling,
    grid_scaling,
    k_transform,
    masks_to_scaling,
)
from .selection import LayerSelector
from .spatial import RefreshSchedule, SpatialGradientScaling, eligible_convs
from .transform import Composed, GradientTransform, ParameterTransform, compose

__version__ = "0.1.0"

__all__ = [
    "BRANCH_KINDS",
    "MEASURES",
    "ChannelDirectedGradients",
    "Composed",
    "GradientTransform",
    "LayerSelector",
    "ParameterTransform",
    "PowerGrad",
    "RefreshSchedule",
    "SpatialGradientScaling",
    "branch_scaling",
    "channel_directed",
    "compose",
    "dependence_to_scaling",
    "eligible_convs",
    "grid_scaling",
    "k_transform",
    "masks_to_scaling",
    "powergrad_cross_entropy",
    "reparam",
    "spatial_dependence",
]
