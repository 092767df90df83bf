"""The harness's architectures by name: CIFAR-style VGG with BatchNorm, ResNet-18/34, a tiny CNN.

:func:`create_model` builds one of :data:`MODELS` for a data set's channel and class counts:

* ``vgg11``, ``vgg13``, ``vgg16``, ``vgg19``: the common CIFAR VGG (Simonyan & Zisserman's
  configurations A, B, D, E): stacks of conv3×3 (padding 1, with bias) → BatchNorm → ReLU
  separated by 2×2 max-pools, then global average pooling, flatten and ONE ``nn.Linear``.  The
  conv bias in front of BatchNorm is redundant but kept, as in the common CIFAR VGG, so VGG-16
  for CIFAR-10 has the usual 14,728,266 parameters.  The max-pools use ``ceil_mode=True`` so a
  small input never pools below 1×1 (8×8 digits: 8→4→2→1→1→1; 28×28: 28→14→7→4→2→1; on
  even sides the sizes equal floor mode's).
* ``resnet18``, ``resnet34``: He et al.'s basic-block ResNets with the CIFAR stem (conv3×3
  stride 1 → BN → ReLU, no max-pool); stages of 64, 128, 256, 512 channels, strides 1, 2, 2, 2,
  a 1×1 conv → BN shortcut where the shape changes, global average pooling, one linear layer.
* ``resnet18-imagenet``, ``resnet34-imagenet``: the same with the ImageNet stem (conv7×7
  stride 2 → BN → ReLU → 3×3 max-pool stride 2).
* ``tiny``: conv3×3(8) → BN → ReLU → conv3×3(16) → BN → ReLU → 2×2 max-pool (ceil mode) →
  conv3×3(32) → BN → ReLU → global average pool → linear; about 6,300 parameters for 8×8
  digits, for fast tests.

Every conv's output feeds exactly one BatchNorm2d and nothing else, so
:func:`gradshape.reparam.following_batchnorms` pairs each conv with its BatchNorm and the
structural methods can convert and fuse every conv.  All models are ``torch.fx``-traceable and
end in ``nn.AdaptiveAvgPool2d(1)``, so they accept any input of at least 1×1 after the stem
(8×8, 28×28, 32×32 and larger).

Initialisation: convs ``kaiming_normal_(mode="fan_out", nonlinearity="relu")`` with zero bias,
BatchNorm weight 1 and bias 0, the linear layer PyTorch's default.  Built under the global
torch RNG, so the same seed gives the same weights.

Example::

    model = create_model("vgg11", num_classes=10, in_channels=1, width=0.25)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["MODELS", "create_model", "scaled_channels"]

_VGG_CONFIGS: dict[str, tuple[int | str, ...]] = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg13": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"),
    "vgg19": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"),
}  # fmt: skip
_RESNET_BLOCKS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}
_TINY_CHANNELS = (8, 16, 32)


def scaled_channels(channels: int, width: float) -> int:
    """``max(1, round(channels · width))`` (Python's ``round``: halves go to the even integer)."""
    return max(1, round(channels * width))


def _conv_bn_relu(c_in: int, c_out: int, *, bias: bool) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=bias),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    ]


class VGG(nn.Module):
    """CIFAR-style VGG with BatchNorm: ``features`` (conv/BN/ReLU/pool), global pool, linear.

    ``drop_last_pool`` removes the max-pool in front of the last conv stage, so that stage
    sees 2× larger maps (4×4 instead of 2×2 for 32×32 inputs); the final max-pool, which only
    the classifier sees, stays.  Input ``(B, in_channels, H, W)`` → logits ``(B, num_classes)``.
    """

    def __init__(
        self,
        config: tuple[int | str, ...],
        *,
        num_classes: int,
        in_channels: int,
        width: float,
        drop_last_pool: bool,
    ) -> None:
        super().__init__()
        if drop_last_pool:  # the pool before the last conv stage; the final one stays
            inner = [i for i, v in enumerate(config[:-1]) if v == "M"][-1]
            config = config[:inner] + config[inner + 1 :]
        layers: list[nn.Module] = []
        c = in_channels
        for v in config:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
            else:
                out = scaled_channels(int(v), width)
                layers += _conv_bn_relu(c, out, bias=True)
                c = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``; conv1 carries the stride.

    The shortcut is the identity, or conv1×1(stride) → BN when the stride or width changes.
    """

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet(nn.Module):
    """Basic-block ResNet: stem, four stages (64/128/256/512 · width), global pool, linear.

    ``imagenet_stem``: conv7×7/2 → BN → ReLU → maxpool3×3/2, else conv3×3/1 → BN → ReLU.
    ``drop_last_pool``: the last stage keeps stride 1 (its convs see 2× larger maps).
    Input ``(B, in_channels, H, W)`` → logits ``(B, num_classes)``.
    """

    def __init__(
        self,
        blocks: tuple[int, ...],
        *,
        num_classes: int,
        in_channels: int,
        width: float,
        imagenet_stem: bool,
        drop_last_pool: bool,
    ) -> None:
        super().__init__()
        stem = scaled_channels(64, width)
        if imagenet_stem:
            self.conv1 = nn.Conv2d(in_channels, stem, 7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(3, stride=2, padding=1)
        else:
            self.conv1 = nn.Conv2d(in_channels, stem, 3, padding=1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU()
        strides = [1, 2, 2, 1 if drop_last_pool else 2]
        stages, c = [], stem
        for count, base, stride in zip(blocks, (64, 128, 256, 512), strides, strict=True):
            out = scaled_channels(base, width)
            stage = [BasicBlock(c, out, stride)]
            stage += [BasicBlock(out, out, 1) for _ in range(count - 1)]
            stages.append(nn.Sequential(*stage))
            c = out
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class TinyCNN(nn.Module):
    """Three conv3×3 → BN → ReLU (8, 16, 32 channels · width) with one 2×2 max-pool after the
    second (removed by ``drop_last_pool``), global average pool, linear.

    Input ``(B, in_channels, H, W)`` → logits ``(B, num_classes)``.
    """

    def __init__(
        self, *, num_classes: int, in_channels: int, width: float, drop_last_pool: bool
    ) -> None:
        super().__init__()
        c1, c2, c3 = (scaled_channels(c, width) for c in _TINY_CHANNELS)
        layers = [*_conv_bn_relu(in_channels, c1, bias=False), *_conv_bn_relu(c1, c2, bias=False)]
        if not drop_last_pool:
            layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
        layers += _conv_bn_relu(c2, c3, bias=False)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def _vgg(name: str) -> Callable[..., nn.Module]:
    return lambda **kw: VGG(_VGG_CONFIGS[name], **kw)


def _resnet(name: str, imagenet_stem: bool) -> Callable[..., nn.Module]:
    return lambda **kw: ResNet(_RESNET_BLOCKS[name], imagenet_stem=imagenet_stem, **kw)


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    **{name: _vgg(name) for name in _VGG_CONFIGS},
    **{name: _resnet(name, False) for name in _RESNET_BLOCKS},
    **{f"{name}-imagenet": _resnet(name, True) for name in _RESNET_BLOCKS},
    "tiny": TinyCNN,
}

#: Names :func:`create_model` builds.
MODELS: tuple[str, ...] = tuple(_BUILDERS)


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def create_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int,
    width: float = 1.0,
    drop_last_pool: bool = False,
) -> nn.Module:
    """Build the architecture ``name`` (one of :data:`MODELS`).

    Args:
        name: the architecture.
        num_classes: outputs of the final linear layer.
        in_channels: channels of the input images.
        width: multiplies every channel count; each becomes :func:`scaled_channels`
            ``max(1, round(c · width))``.
        drop_last_pool: make the deepest convs see 2× larger maps.  VGG: remove the max-pool
            in front of the last conv stage (the final pool, after every conv, would change
            nothing the convs see); ResNet: give the last stage stride 1; tiny: remove its
            only max-pool.  The parameter count does not change.

    Returns:
        The model in training mode, initialised as the module docstring says.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")
    for label, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"create_model: {label} must be an int >= 1, got {value!r}")
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not 0 < width < math.inf:
        raise ValueError(f"create_model: width must be a finite number > 0, got {width!r}")
    model = _BUILDERS[name](
        num_classes=num_classes,
        in_channels=in_channels,
        width=float(width),
        drop_last_pool=drop_last_pool,
    )
    _init_weights(model)
    return model
