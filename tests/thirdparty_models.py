"""Small third-party architectures for tests/test_thirdparty.py, built from their configs.

Every model is built from its config class with tiny sizes (no weights, no data from a hub)
under a fixed seed, so ``case.build()`` returns the same weights each time.  Each case also
carries its refresh batch and, written out here from the architecture (not read from the
model), how many convolutions of each kind it has:

* ``"scaled"``: Conv1d/2d/3d with a kernel > 1 whose weight requires grad;
* ``"1x1"``, ``"transposed"``, ``"frozen"`` (weight.requires_grad False);
* ``"even"`` (some kernel extent even), ``"patchify"`` (stride >= kernel in every dim) and
  ``"even+patchify"``: skipped unless the case opts in with ``even_kernels``/``patchify``.

Importing this module needs ``transformers`` and ``monai``; the test module skips without.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import monai.networks.blocks as monai_blocks
import monai.networks.nets as monai_nets
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers.models.efficientnet.modeling_efficientnet import round_filters

SEED = 0


@dataclass
class Case:
    """One architecture: how to build it, what to feed it, and its convs counted by kind.

    Attributes:
        name: test id.
        build: returns the model (same weights on every call).
        batch: returns the refresh batch (a tensor, or a dict of keyword arguments).
        counts: number of convs of each kind (see the module docstring), from the architecture.
        options: extra keyword arguments for ``SpatialGradientScaling`` (opt-ins).
        valid_lengths: for masked 1-D batches, module name -> per-example valid input length
            of that conv (from the mask through the strides); ``None`` elsewhere.
        grad_in_train_mode: compute gradients in train mode (a branch used only in training).
        dead: names of convs whose off-centre taps are all dead on this batch.
        per_branch_kinds: the ``reparam.convert`` kinds tried with ``bn="per_branch"`` (models
            with BatchNorm2d only).
    """

    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[], Any]
    counts: dict[str, int]
    options: dict[str, bool] = field(default_factory=dict)
    valid_lengths: dict[str, list[int]] | None = None
    grad_in_train_mode: bool = False
    dead: tuple[str, ...] = ()
    per_branch_kinds: tuple[str, ...] = ("acb", "repvgg", "dbb")


def _seeded(fn: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            model = fn()
            _randomise_batchnorm(model)
        return model

    return build


def _randomise_batchnorm(model: nn.Module) -> None:
    """Give every BatchNorm running statistics and an affine map far from the identity, so
    that folding them (``reparam.fuse``) is exercised."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.normal_(0.0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                if m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0.0, 0.2)


def smooth(*shape: int, seed: int, factor: int = 4) -> torch.Tensor:
    """Spatially correlated noise ``(N, C, *spatial)``: coarse noise upsampled, plus fine noise.

    Neighbouring pixels then depend on each other, so the scalings are far from flat.
    """
    gen = torch.Generator().manual_seed(seed)
    n, c, *spatial = shape
    coarse = torch.randn(n, c, *(max(1, s // factor) for s in spatial), generator=gen)
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(spatial)]
    up = F.interpolate(coarse, size=tuple(spatial), mode=mode, align_corners=False)
    return up + 0.3 * torch.randn(shape, generator=gen)


# ---- Hugging Face vision -----------------------------------------------------------------


def resnet() -> Case:
    """ResNet (basic blocks, depths 1+1) with its 7x7 stem frozen, as in fine-tuning."""

    def build() -> nn.Module:
        cfg = transformers.ResNetConfig(
            embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"
        )
        model = transformers.ResNetModel(cfg)
        model.embedder.embedder.convolution.weight.requires_grad_(False)
        return model

    # two 3x3 per basic block; a 1x1 shortcut where the stage changes width (stage 2 only)
    counts = {"frozen": 1, "scaled": 2 * 2, "1x1": 1}
    return Case("hf-resnet", _seeded(build), lambda: smooth(4, 3, 32, 32, seed=1), counts)


def convnext() -> Case:
    """ConvNeXt, three stages on 32x32: the 7x7 depthwise conv of stage 3 sees a 2x2 map, so
    its taps beyond ±1 are dead."""

    def build() -> nn.Module:
        cfg = transformers.ConvNextConfig(hidden_sizes=[8, 16, 16], depths=[1, 1, 1], num_stages=3)
        return transformers.ConvNextModel(cfg)

    # 4x4/4 patchify stem, 2x2/2 downsampling before stages 2 and 3, one 7x7 dwconv per block
    counts = {"even+patchify": 1 + 2, "scaled": 3}
    return Case("hf-convnext", _seeded(build), lambda: smooth(4, 3, 32, 32, seed=2), counts)


def regnet() -> Case:
    """RegNetY: grouped 3x3 convs, 1x1 convs and squeeze-excitation."""

    def build() -> nn.Module:
        cfg = transformers.RegNetConfig(
            embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=4, layer_type="y"
        )
        return transformers.RegNetModel(cfg)

    # stem 3x3 + one grouped 3x3 per layer; per layer two 1x1 + two SE 1x1 + a 1x1 shortcut
    counts = {"scaled": 1 + 2, "1x1": 2 * (2 + 2 + 1)}
    return Case("hf-regnet", _seeded(build), lambda: smooth(4, 3, 32, 32, seed=3), counts)


def mobilenet_v1() -> Case:
    """MobileNetV1 with TensorFlow padding (F.pad in the wrapper, conv padding 0)."""

    def build() -> nn.Module:
        cfg = transformers.MobileNetV1Config(depth_multiplier=0.125, min_depth=4, image_size=64)
        return transformers.MobileNetV1Model(cfg)

    # 3x3 stem + 13 depthwise 3x3, 13 pointwise 1x1
    counts = {"scaled": 1 + 13, "1x1": 13}
    return Case("hf-mobilenet-v1", _seeded(build), lambda: smooth(2, 3, 64, 64, seed=4), counts)


def mobilenet_v2() -> Case:
    """MobileNetV2 (its conv wrapper reads ``convolution.dilation`` in forward)."""

    def build() -> nn.Module:
        cfg = transformers.MobileNetV2Config(
            depth_multiplier=0.125,
            image_size=64,
            depth_divisible_by=4,
            min_depth=4,
            finegrained_output=False,
        )
        return transformers.MobileNetV2Model(cfg)

    # stem: 3x3, depthwise 3x3, 1x1 reduce; 16 inverted residuals: 1x1, dw 3x3, 1x1; head 1x1
    counts = {"scaled": 2 + 16, "1x1": 1 + 2 * 16 + 1}
    return Case("hf-mobilenet-v2", _seeded(build), lambda: smooth(2, 3, 64, 64, seed=5), counts)


def efficientnet() -> Case:
    """EfficientNet: "valid" convs behind nn.ZeroPad2d, "same" padding, a depthwise subclass."""

    def build() -> nn.Module:
        cfg = transformers.EfficientNetConfig(
            width_coefficient=0.25,
            depth_coefficient=1.0,
            depth_divisor=4,
            image_size=32,
            kernel_sizes=(3, 5),
            in_channels=(32, 16),
            out_channels=(16, 24),
            strides=(1, 2),
            num_block_repeats=(1, 1),
            expand_ratios=(1, 4),
            dropout_rate=0.0,
            drop_connect_rate=0.0,
        )
        cfg.hidden_dim = round_filters(cfg, 1280)
        return transformers.EfficientNetModel(cfg)

    # stem 3x3 + a depthwise conv per block; per block SE reduce/expand and projection 1x1,
    # the expansion 1x1 of block 2 (ratio 4), the top 1x1
    counts = {"scaled": 1 + 2, "1x1": 2 * 3 + 1 + 1}
    return Case("hf-efficientnet", _seeded(build), lambda: smooth(4, 3, 32, 32, seed=6), counts)


def bit() -> Case:
    """BiT: weight-standardised convs (derived weight) with dynamic "SAME" padding by F.pad
    inside the conv's own forward."""

    def build() -> nn.Module:
        cfg = transformers.BitConfig(
            embedding_size=8,
            hidden_sizes=[16, 32],
            depths=[1, 1],
            num_groups=4,
            global_padding="SAME",
            embedding_dynamic_padding=True,
        )
        return transformers.BitModel(cfg)

    # 7x7 stem + one 3x3 per bottleneck; per bottleneck 1x1 in, 1x1 out, 1x1 downsample
    counts = {"scaled": 1 + 2, "1x1": 3 * 2}
    return Case("hf-bit", _seeded(build), lambda: smooth(4, 3, 32, 32, seed=7), counts)


def vit() -> Case:
    """ViT whose only conv is its 3x3 stride-3 patch embedding (odd, patchify)."""

    def build() -> nn.Module:
        cfg = transformers.ViTConfig(
            image_size=15,
            patch_size=3,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
        )
        return transformers.ViTModel(cfg)

    return Case(
        "hf-vit-patch3",
        _seeded(build),
        lambda: smooth(4, 3, 15, 15, seed=8),
        {"patchify": 1},
        options={"patchify": True},
    )


def swin() -> Case:
    """Swin whose only conv is its 4x4 stride-4 patch embedding (even and patchify)."""

    def build() -> nn.Module:
        cfg = transformers.SwinConfig(
            image_size=16, patch_size=4, embed_dim=8, depths=[1], num_heads=[2], window_size=2
        )
        return transformers.SwinModel(cfg)

    return Case(
        "hf-swin-patch4",
        _seeded(build),
        lambda: smooth(4, 3, 16, 16, seed=9),
        {"even+patchify": 1},
        options={"even_kernels": True, "patchify": True},
    )


def mobilevit_aspp() -> Case:
    """MobileViT with its DeepLabV3 head: ASPP rates 2, 6 and 12 on an 8x8 map (output
    stride 8), so the rate-12 branch has only dead off-centre taps."""

    def build() -> nn.Module:
        cfg = transformers.MobileViTConfig(
            image_size=64,
            hidden_sizes=[16, 16, 16],
            neck_hidden_sizes=[4, 4, 8, 8, 8, 8, 16],
            num_attention_heads=2,
            aspp_out_channels=8,
            atrous_rates=[2, 6, 12],
            expand_ratio=2.0,
            mlp_ratio=1.0,
            output_stride=8,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            classifier_dropout_prob=0.0,
            aspp_dropout_prob=0.0,
        )
        return transformers.MobileViTForSemanticSegmentation(cfg)

    # 3x3: stem, 1 + 3 MobileNetV2 blocks (dw), 3 MobileViT stages x (dw of the downsampling
    # block, conv_kxk, fusion), 3 dilated ASPP branches.  1x1: 2 per MobileNetV2 block (7),
    # conv_1x1 and conv_projection per stage (6), ASPP 1x1 branch, pooling branch, projection,
    # classifier (4)
    counts = {"scaled": 1 + 4 + 9 + 3, "1x1": 2 * 7 + 6 + 4}
    return Case(
        "hf-mobilevit-aspp",
        _seeded(build),
        lambda: smooth(2, 3, 64, 64, seed=10),
        counts,
        dead=("segmentation_head.aspp.convs.3.convolution",),
        # finding each conv's BatchNorm traces its enclosing modules with torch.fx: about a
        # second per conversion here, so one kind (the others run on the smaller models)
        per_branch_kinds=("dbb",),
    )


# ---- Hugging Face audio: wav2vec2 feature encoder with padding masks --------------------

W2V_KERNELS = (5, 3, 3, 2)
W2V_STRIDES = (4, 2, 2, 2)
W2V_LENGTHS = (400, 331, 250)


def wav2vec2_model() -> nn.Module:
    """Wav2Vec2 with a 4-layer feature encoder (LayerNorm per time step, so valid features do
    not depend on how much padding follows them) and a weight-normed positional conv, in
    float64."""
    cfg = transformers.Wav2Vec2Config(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        conv_dim=(8, 8, 8, 8),
        conv_kernel=W2V_KERNELS,
        conv_stride=W2V_STRIDES,
        conv_bias=True,
        feat_extract_norm="layer",
        num_conv_pos_embeddings=3,
        num_conv_pos_embedding_groups=4,
        hidden_dropout=0.0,
        activation_dropout=0.0,
        attention_dropout=0.0,
        feat_proj_dropout=0.0,
        layerdrop=0.0,
        mask_time_prob=0.0,
    )
    return transformers.Wav2Vec2Model(cfg).double()


def audio_batch(padded_length: int, seed: int = 11) -> dict[str, torch.Tensor]:
    """The clips of lengths ``W2V_LENGTHS`` (sums of low tones plus noise), zero-padded to
    ``padded_length``, with the Hugging Face ``attention_mask`` (1 = valid)."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.zeros(len(W2V_LENGTHS), padded_length, dtype=torch.float64)
    mask = torch.zeros(len(W2V_LENGTHS), padded_length, dtype=torch.long)
    for i, n in enumerate(W2V_LENGTHS):
        t = torch.arange(n, dtype=torch.float64)
        freqs = torch.rand(3, generator=gen, dtype=torch.float64) * 0.05
        tone = sum(torch.sin(2 * math.pi * f * t + 1.7 * j) for j, f in enumerate(freqs))
        values[i, :n] = tone + 0.3 * torch.randn(n, generator=gen, dtype=torch.float64)
        mask[i, :n] = 1
    return {"input_values": values, "attention_mask": mask}


def wav2vec2_valid_lengths() -> dict[str, list[int]]:
    """Valid input length of each conv for each clip: L -> (L - k) // s + 1 per encoder conv
    (no padding); the positional conv sees the encoder's output length."""
    lengths = list(W2V_LENGTHS)
    out: dict[str, list[int]] = {}
    for i, (k, s) in enumerate(zip(W2V_KERNELS, W2V_STRIDES, strict=True)):
        out[f"feature_extractor.conv_layers.{i}.conv"] = lengths
        lengths = [(n - k) // s + 1 for n in lengths]
    out["encoder.pos_conv_embed.conv"] = lengths
    return out


def wav2vec2() -> Case:
    """wav2vec2: strided Conv1d feature encoder under an attention mask, clips padded to the
    longest one."""
    # k5/s4, k3/s2, k3/s2 scaled; k2/s2 even and patchify; positional k3 (weight-normed)
    return Case(
        "hf-wav2vec2",
        _seeded(wav2vec2_model),
        lambda: audio_batch(max(W2V_LENGTHS)),
        {"scaled": 3 + 1, "even+patchify": 1},
        valid_lengths=wav2vec2_valid_lengths(),
    )


# ---- MONAI 3-D ---------------------------------------------------------------------------


def monai_unet() -> Case:
    """MONAI 3-D UNet, three levels, one residual unit each: strided 3x3x3 convs with 3x3x3
    residual convs, transposed convs on the way up."""

    def build() -> nn.Module:
        return monai_nets.UNet(
            spatial_dims=3,
            in_channels=1,
            out_channels=2,
            channels=(4, 8, 16),
            strides=(2, 2),
            num_res_units=1,
        )

    levels = 3
    # down: conv + strided 3x3x3 residual per level; bottom: conv + 1x1x1 residual (width
    # change); up: transposed conv + conv per level
    counts = {"scaled": 2 * (levels - 1) + 1 + (levels - 1), "1x1": 1, "transposed": levels - 1}
    return Case("monai-unet3d", _seeded(build), lambda: smooth(2, 1, 16, 16, 16, seed=12), counts)


def monai_segresnet() -> Case:
    """MONAI 3-D SegResNet, four levels on an 8^3 crop: the bottom level is 1x1x1, so its
    3x3x3 convs have only dead off-centre taps (a deep 3-D case)."""

    def build() -> nn.Module:
        return monai_nets.SegResNet(
            spatial_dims=3,
            in_channels=1,
            out_channels=2,
            init_filters=4,
            blocks_down=(1, 1, 1, 1),
            blocks_up=(1, 1, 1),
            norm=("GROUP", {"num_groups": 2}),
        )

    # init conv; per level a strided pre-conv (not level 1) and a ResBlock of two 3x3x3;
    # per up level a ResBlock of two 3x3x3 and a 1x1x1 before upsampling; the final 1x1x1
    counts = {"scaled": 1 + 3 + 2 * 4 + 2 * 3, "1x1": 3 + 1}
    return Case(
        "monai-segresnet3d",
        _seeded(build),
        lambda: smooth(4, 1, 8, 8, 8, seed=13, factor=2),
        counts,
        dead=("down_layers.3.1.conv1.conv", "down_layers.3.1.conv2.conv"),
    )


def monai_densenet() -> Case:
    """MONAI 3-D DenseNet: 7x7x7 stem, BN-ReLU-1x1x1-BN-ReLU-3x3x3 dense layers."""

    def build() -> nn.Module:
        return monai_nets.DenseNet(
            spatial_dims=3,
            in_channels=1,
            out_channels=2,
            init_features=8,
            growth_rate=4,
            block_config=(2, 2),
            bn_size=2,
        )

    # stem + a 3x3x3 per dense layer; a 1x1x1 per dense layer and per transition
    counts = {"scaled": 1 + 4, "1x1": 4 + 1}
    return Case(
        "monai-densenet3d", _seeded(build), lambda: smooth(2, 1, 16, 16, 16, seed=14), counts
    )


def monai_aspp() -> Case:
    """MONAI's 3-D SimpleASPP on a 4^3 map: 3x3x3 at dilation 2 (all taps live), 5x5x5 at
    dilation 2 (taps at ±4 dead: live box 3x3x3), 3x3x3 at dilation 6 (all off-centre dead)."""

    def build() -> nn.Module:
        return monai_blocks.SimpleASPP(
            spatial_dims=3,
            in_channels=4,
            conv_out_channels=2,
            kernel_sizes=(1, 3, 5, 3),
            dilations=(1, 2, 2, 6),
        )

    return Case(
        "monai-aspp3d",
        _seeded(build),
        lambda: smooth(4, 4, 4, 4, 4, seed=15, factor=2),
        {"scaled": 3, "1x1": 2},
        dead=("convs.3",),
    )


# ---- issue 20's kinds: a train-only branch and a conv used only through F.conv1d ---------


class HiddenConvs(nn.Module):
    """``aux`` runs only in training; ``mix``'s weight is passed straight to F.conv1d (causal:
    left context only, by padding 2 and keeping the first L outputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Conv2d(3, 8, 3, padding=1)
        self.aux = nn.Conv2d(8, 8, 5)
        self.mix = nn.Conv1d(8, 8, 3, groups=8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.body(x))
        seq = h.flatten(2)
        s = F.conv1d(seq, self.mix.weight, self.mix.bias, padding=2, groups=8)
        out = s[..., : seq.shape[-1]].mean((1, 2))
        if self.training:
            out = out + self.aux(h).mean((1, 2, 3))
        return out


def hidden_convs() -> Case:
    return Case(
        "issue20-hidden-convs",
        _seeded(HiddenConvs),
        lambda: smooth(4, 3, 16, 16, seed=16),
        {"scaled": 3},
        grad_in_train_mode=True,
    )


def cases() -> list[Case]:
    """Every architecture, in test order."""
    return [
        resnet(),
        convnext(),
        regnet(),
        mobilenet_v1(),
        mobilenet_v2(),
        efficientnet(),
        bit(),
        vit(),
        swin(),
        mobilevit_aspp(),
        wav2vec2(),
        monai_unet(),
        monai_segresnet(),
        monai_densenet(),
        monai_aspp(),
        hidden_convs(),
    ]
