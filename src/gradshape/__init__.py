"""gradshape: reshape convolutional gradients in the backward pass.

Spatial Gradient Scaling (Detkov et al., ICLR 2023), Channel-Directed Gradients (Lao et al.),
the PowerGrad Transform (Das et al.), and the structural reparameterizations they stand in for.

    import gradshape as gs
    sgs = gs.SpatialGradientScaling(model)      # G = 1 until the first refresh
    sgs.maybe_refresh(epoch, train_loader)      # each epoch: paper's schedule
"""

from .dependence import MEASURES, spatial_dependence
from .scaling import (
    BRANCH_KINDS,
    branch_scaling,
    dependence_to_scaling,
    grid_scaling,
    k_transform,
    masks_to_scaling,
)
from .spatial import RefreshSchedule, SpatialGradientScaling, eligible_convs
from .transform import Composed, GradientTransform, ParameterTransform, compose

__version__ = "0.1.0"

__all__ = [
    "BRANCH_KINDS",
    "MEASURES",
    "Composed",
    "GradientTransform",
    "ParameterTransform",
    "RefreshSchedule",
    "SpatialGradientScaling",
    "branch_scaling",
    "compose",
    "dependence_to_scaling",
    "eligible_convs",
    "grid_scaling",
    "k_transform",
    "masks_to_scaling",
    "spatial_dependence",
]
